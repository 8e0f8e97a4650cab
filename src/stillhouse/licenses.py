"""Open-weights licenses and what they ask of a distilled student, checked before anything is published.

    check = check_licenses(student_license="llama3.1", repo_id="alice/Llama-3.1-tiny",
                           teacher_license="llama3.1", base_model_license=None)
    check.enforce(override=None)     # raises LicenseError quoting the clause a violation breaks

A student inherits obligations from two models in two roles:

- its **base model** (``train.student``, the weights it starts from): the student is a derivative
  work of it, so every redistribution term of that license applies;
- its **teacher**: the student is trained on the teacher's outputs. Some terms reach that far
  (Llama 3.1+ naming, Gemma and RAIL licenses that call a distilled model a derivative, Llama 2/3
  and Tongyi Qianwen forbidding outputs to improve other models), most permissive licenses don't.

``LICENSES`` is the table: one entry per license id (the Hub's ``license:`` value, or its
``license_name:`` when ``license: other``), with each duty and the clause it comes from, quoted from
the license text. It is a summary to stop obvious mistakes early, not legal advice; a reason in
``publish.license_override`` lets a publisher who has read the terms go ahead, and that reason is
written into the model card. Where a license leaves room (a non-commercial teacher's outputs), the
check takes the stricter reading.

No network: license ids come from the config, the local model folder's README front matter, or the
local Hugging Face cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stillhouse.builtins import is_builtin
from stillhouse.errors import StillhouseError


class LicenseError(StillhouseError):
    """Publishing would break a license's terms, or a license is unknown; the message quotes the clause."""


@dataclass(frozen=True)
class Clause:
    section: str
    text: str

    def quote(self) -> str:
        return f'{self.section}: "{self.text}"'


@dataclass(frozen=True)
class LicenseTerms:
    """What one license asks of models derived from (or trained on the outputs of) a model under it."""

    id: str
    name: str
    url: str
    commercial: bool = True  # False: research / non-commercial use only
    hub_id: bool = True  # a value the Hub accepts in `license:`; else the card says `license: other` + `license_name`
    derivative_licenses: frozenset[str] | None = None  # licenses a derivative may carry; None: any
    outputs_make_derivatives: bool = False  # a model trained on its outputs (distillation) counts as a derivative
    outputs_only_improve: frozenset[str] | None = None  # outputs may improve only models under these licenses
    name_prefix: str | None = None  # derivative model names must start with this
    naming_covers_outputs: bool = False  # the naming duty also applies to models trained on its outputs
    attribution: str | None = None  # text derivatives must display
    use_policy: str | None = None  # acceptable-use / prohibited-use policy that derivatives must pass on
    clauses: dict[str, Clause] = field(default_factory=dict)  # duty -> the clause it comes from


LLAMA_31_STYLE = (
    "If you distribute or make available the Llama Materials (or any derivative works thereof), or a product or service "
    "(including another AI model) that contains any of them, you shall (A) provide a copy of this Agreement with any such "
    "Llama Materials; and (B) prominently display “Built with Llama” on a related website, user interface, blogpost, about "
    "page, or product documentation."
)
LLAMA_31_NAMING = (
    "If you use the Llama Materials or any outputs or results of the Llama Materials to create, train, fine tune, or "
    "otherwise improve an AI model, which is distributed or made available, you shall also include “Llama” at the "
    "beginning of any such AI model name."
)


def _llama_3x(version: str, url: str, use_policy: str) -> LicenseTerms:
    return LicenseTerms(
        id=f"llama{version}",
        name=f"Llama {version} Community License Agreement",
        url=url,
        derivative_licenses=frozenset({f"llama{version}"}),
        name_prefix="Llama",
        naming_covers_outputs=True,
        attribution="Built with Llama",
        use_policy=use_policy,
        clauses={
            "derivatives": Clause("§1.b.i", LLAMA_31_STYLE),
            "attribution": Clause("§1.b.i", LLAMA_31_STYLE),
            "name_prefix": Clause("§1.b.i", LLAMA_31_NAMING),
            "use_policy": Clause(
                "§1.b.iv",
                "Your use of the Llama Materials must comply with applicable laws and regulations "
                "(including trade compliance laws and regulations) and adhere to the Acceptable Use Policy for the Llama Materials",
            ),
        },
    )


RAIL_DERIVATIVES = Clause(
    "§1 (Definitions)",
    "“Derivatives of the Model” means all modifications to the Model, works based on the Model, or any other model which is "
    "created or initialized by transfer of patterns of the weights, parameters, activations or output of the Model, to the other "
    "model, in order to cause the other model to perform similarly to the Model, including - but not limited to - distillation "
    "methods entailing the use of intermediate data representations or methods based on the generation of synthetic data by the "
    "Model for training the other model.",
)
RAIL_PASS_ON = Clause(
    "§4(a)",
    "Use-based restrictions as referenced in paragraph 5 MUST be included as an enforceable provision by You in any type of legal "
    "agreement (e.g. a license) governing the use and/or distribution of the Model or its Derivatives",
)
OPENRAIL_FAMILY = frozenset(
    {"openrail", "openrail++", "bigscience-openrail-m", "creativeml-openrail-m", "bigcode-openrail-m"}
)
NON_COMMERCIAL_CC = Clause(
    "§1(i) and §2(a)(1)",
    "NonCommercial means not primarily intended for or directed towards commercial advantage or monetary compensation.",
)
QWEN_OUTPUTS = Clause(
    "§5(c) (Qwen Research) / §5(b) (Qwen)",
    "If you use the Materials or any outputs or results therefrom to create, train, fine-tune, or improve an AI model that is "
    "distributed or made available, you shall prominently display “Built with Qwen” or “Improved using Qwen” in the related "
    "product documentation.",
)
QWEN_PASS_ON = Clause(
    "§4(a)", "You shall give any other recipients of the Materials or derivative works a copy of this Agreement"
)

LICENSES: dict[str, LicenseTerms] = {
    terms.id: terms
    for terms in [
        # -- permissive: any license for derivatives, keep the notices -----------------------------------
        LicenseTerms(
            id="apache-2.0",
            name="Apache License 2.0",
            url="https://www.apache.org/licenses/LICENSE-2.0",
            clauses={
                "notice": Clause(
                    "§4(a)", "You must give any other recipients of the Work or Derivative Works a copy of this License"
                )
            },
        ),
        LicenseTerms(
            id="mit",
            name="MIT License",
            url="https://opensource.org/license/mit",
            clauses={
                "notice": Clause(
                    "",
                    "The above copyright notice and this permission notice shall be included in all copies or substantial portions of the Software.",
                )
            },
        ),
        LicenseTerms(
            id="bsd-3-clause",
            name="BSD 3-Clause License",
            url="https://opensource.org/license/bsd-3-clause",
            clauses={
                "notice": Clause(
                    "clause 2",
                    "Redistributions in binary form must reproduce the above copyright notice, this list of conditions "
                    "and the following disclaimer in the documentation and/or other materials provided with the distribution.",
                )
            },
        ),
        LicenseTerms(
            id="cc-by-4.0",
            name="Creative Commons Attribution 4.0",
            url="https://creativecommons.org/licenses/by/4.0/legalcode",
            clauses={
                "notice": Clause(
                    "§3(a)(1)",
                    "If You Share the Licensed Material (including in modified form), You must retain identification "
                    "of the creator(s) of the Licensed Material",
                )
            },
        ),
        # -- non-commercial -----------------------------------------------------------------------------
        LicenseTerms(
            id="cc-by-nc-4.0",
            name="Creative Commons Attribution-NonCommercial 4.0",
            url="https://creativecommons.org/licenses/by-nc/4.0/legalcode",
            commercial=False,
            clauses={
                "non_commercial": NON_COMMERCIAL_CC,
                "notice": Clause(
                    "§3(a)(1)",
                    "If You Share the Licensed Material (including in modified form), You must retain "
                    "identification of the creator(s) of the Licensed Material",
                ),
            },
        ),
        LicenseTerms(
            id="cc-by-nc-sa-4.0",
            name="Creative Commons Attribution-NonCommercial-ShareAlike 4.0",
            url="https://creativecommons.org/licenses/by-nc-sa/4.0/legalcode",
            commercial=False,
            derivative_licenses=frozenset({"cc-by-nc-sa-4.0"}),
            clauses={
                "non_commercial": NON_COMMERCIAL_CC,
                "derivatives": Clause(
                    "§3(b)(1)",
                    "The Adapter’s License You apply must be a Creative Commons license with the same License "
                    "Elements, this version or later, or a BY-NC-SA Compatible License.",
                ),
            },
        ),
        # -- responsible-AI licenses: a distilled model is a derivative; pass on the use restrictions --------
        *[
            LicenseTerms(
                id=rail_id,
                name=f"{rail_id} (Open RAIL)",
                url="https://www.licenses.ai/",
                outputs_make_derivatives=True,
                derivative_licenses=OPENRAIL_FAMILY,
                use_policy="the use-based restrictions (Attachment A) of the license",
                clauses={"derivatives": RAIL_DERIVATIVES, "use_policy": RAIL_PASS_ON},
            )
            for rail_id in sorted(OPENRAIL_FAMILY)
        ],
        LicenseTerms(
            id="deepseek",
            name="DeepSeek License Agreement 1.0",
            url="https://github.com/deepseek-ai/DeepSeek-LLM/blob/main/LICENSE-MODEL",
            hub_id=False,
            outputs_make_derivatives=True,
            derivative_licenses=frozenset({"deepseek"}),
            use_policy="the use-based restrictions in Attachment A of the DeepSeek License",
            clauses={"derivatives": RAIL_DERIVATIVES, "use_policy": RAIL_PASS_ON},
        ),
        # -- Meta Llama ------------------------------------------------------------------------------------
        LicenseTerms(
            id="llama2",
            name="Llama 2 Community License Agreement",
            url="https://ai.meta.com/llama/license/",
            derivative_licenses=frozenset({"llama2"}),
            outputs_only_improve=frozenset({"llama2"}),
            use_policy="https://ai.meta.com/llama/use-policy/",
            clauses={
                "derivatives": Clause(
                    "§1.b.i",
                    "If you distribute or make the Llama Materials, or any derivative works thereof, available to a "
                    "third party, you shall provide a copy of this Agreement to such third party.",
                ),
                "outputs": Clause(
                    "§1.b.v",
                    "You will not use the Llama Materials or any output or results of the Llama Materials to improve any "
                    "other large language model (excluding Llama 2 or derivative works thereof).",
                ),
                "use_policy": Clause(
                    "§1.b.iv",
                    "Your use of the Llama Materials must comply with applicable laws and regulations (including trade "
                    "compliance laws and regulations) and adhere to the Acceptable Use Policy for the Llama Materials",
                ),
            },
        ),
        LicenseTerms(
            id="llama3",
            name="Meta Llama 3 Community License Agreement",
            url="https://www.llama.com/llama3/license/",
            derivative_licenses=frozenset({"llama3"}),
            outputs_only_improve=frozenset({"llama3"}),
            name_prefix="Llama 3",
            attribution="Built with Meta Llama 3",
            use_policy="https://www.llama.com/llama3/use-policy/",
            clauses={
                "derivatives": Clause(
                    "§1.b.i",
                    "If you distribute or make available the Llama Materials (or any derivative works thereof), or a "
                    "product or service that uses any of them, including another AI model, you shall (A) provide a copy of this "
                    "Agreement with any such Llama Materials; and (B) prominently display “Built with Meta Llama 3” on a related "
                    "website, user interface, blogpost, about page, or product documentation.",
                ),
                "name_prefix": Clause(
                    "§1.b.i",
                    "If you use the Llama Materials to create, train, fine tune, or otherwise improve an AI model, which "
                    "is distributed or made available, you shall also include “Llama 3” at the beginning of any such AI model name.",
                ),
                "outputs": Clause(
                    "§1.b.v",
                    "You will not use the Llama Materials or any output or results of the Llama Materials to improve any "
                    "other large language model (excluding Meta Llama 3 or derivative works thereof).",
                ),
                "use_policy": Clause(
                    "§1.b.iv",
                    "Your use of the Llama Materials must comply with applicable laws and regulations (including trade "
                    "compliance laws and regulations) and adhere to the Acceptable Use Policy for the Llama Materials",
                ),
            },
        ),
        _llama_3x("3.1", "https://www.llama.com/llama3_1/license/", "https://www.llama.com/llama3_1/use-policy/"),
        _llama_3x("3.2", "https://www.llama.com/llama3_2/license/", "https://www.llama.com/llama3_2/use-policy/"),
        _llama_3x("3.3", "https://www.llama.com/llama3_3/license/", "https://www.llama.com/llama3_3/use-policy/"),
        _llama_3x("4", "https://www.llama.com/llama4/license/", "https://www.llama.com/llama4/use-policy/"),
        # -- Google Gemma: a distilled model is a Model Derivative --------------------------------------------
        LicenseTerms(
            id="gemma",
            name="Gemma Terms of Use",
            url="https://ai.google.dev/gemma/terms",
            outputs_make_derivatives=True,
            derivative_licenses=frozenset({"gemma"}),
            use_policy="https://ai.google.dev/gemma/prohibited_use_policy",
            attribution="Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms",
            clauses={
                "derivatives": Clause(
                    "§1.1(e)",
                    "“Model Derivatives” means all (i) modifications to Gemma, (ii) works based on Gemma, or (iii) any "
                    "other machine learning model which is created by transfer of patterns of the weights, parameters, operations, "
                    "or Output of Gemma, to that model in order to cause that model to perform similarly to Gemma, including "
                    "distillation methods that use intermediate data representations or methods based on the generation of "
                    "synthetic data Outputs by Gemma for training that model.",
                ),
                "use_policy": Clause(
                    "§3.1",
                    "You must include the use restrictions referenced in Section 3.2 as an enforceable provision in any "
                    "agreement (e.g., license agreement, terms of use, etc.) governing the use and/or distribution of Gemma or "
                    "Model Derivatives and you must provide notice to subsequent users you Distribute to that Gemma or Model "
                    "Derivatives are subject to the use restrictions in Section 3.2.",
                ),
                "attribution": Clause(
                    "§3.1",
                    "You must provide all third party recipients of Gemma or Model Derivatives a copy of this Agreement.",
                ),
            },
        ),
        # -- Alibaba Qwen ------------------------------------------------------------------------------------
        LicenseTerms(
            id="qwen",
            name="Qwen License Agreement",
            url="https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/LICENSE",
            hub_id=False,
            derivative_licenses=frozenset({"qwen"}),
            attribution="Built with Qwen",
            clauses={"derivatives": QWEN_PASS_ON, "attribution": QWEN_OUTPUTS},
        ),
        LicenseTerms(
            id="qwen-research",
            name="Qwen Research License Agreement",
            url="https://huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/LICENSE",
            hub_id=False,
            commercial=False,
            derivative_licenses=frozenset({"qwen-research"}),
            attribution="Built with Qwen",
            clauses={
                "derivatives": QWEN_PASS_ON,
                "attribution": QWEN_OUTPUTS,
                "non_commercial": Clause(
                    "§1(i)", "“Non-Commercial” shall mean solely for research or evaluation purposes"
                ),
            },
        ),
        LicenseTerms(
            id="tongyi-qianwen",
            name="Tongyi Qianwen License Agreement",
            url="https://github.com/QwenLM/Qwen/blob/main/Tongyi%20Qianwen%20LICENSE%20AGREEMENT",
            hub_id=False,
            derivative_licenses=frozenset({"tongyi-qianwen"}),
            outputs_only_improve=frozenset({"tongyi-qianwen"}),
            clauses={
                "derivatives": QWEN_PASS_ON,
                "outputs": Clause(
                    "§5(c)",
                    "You can not use the Materials or any output therefrom to improve any other large language model "
                    "(excluding Tongyi Qianwen or derivative works thereof).",
                ),
            },
        ),
        # -- Mistral AI Research License: research only, outputs included --------------------------------------
        LicenseTerms(
            id="mrl",
            name="Mistral AI Research License",
            url="https://mistral.ai/licenses/MRL-0.1.md",
            hub_id=False,
            commercial=False,
            derivative_licenses=frozenset({"mrl"}),
            clauses={
                "non_commercial": Clause(
                    "§1 (Definitions)",
                    "“Research Purposes”: means any use of a Mistral Model, Derivative, or Output "
                    "that is solely for (a) personal, scientific or academic research, and (b) for non-profit and "
                    "non-commercial purposes, and not directly or indirectly connected to any commercial activities or "
                    "business operations.",
                ),
                "derivatives": Clause(
                    "§2.2",
                    "You must provide a copy of this Agreement to any recipient of the Mistral Models or Derivatives",
                ),
            },
        ),
    ]
}


def known_ids() -> str:
    return ", ".join(sorted(LICENSES))


def normalise_license_id(value: str) -> str:
    return value.strip().lower()


def license_from_front_matter(readme: str) -> str | None:
    """The license id in a model card's YAML front matter: `license`, or `license_name` when `license: other`."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme, re.DOTALL)
    if not match:
        return None
    try:
        card = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    if not isinstance(card, dict) or not card.get("license"):
        return None
    license_id = str(card["license"])
    if license_id == "other" and card.get("license_name"):
        license_id = str(card["license_name"])
    return normalise_license_id(license_id)


def local_model_license(reference: str | None) -> str | None:
    """A model's license from local files only: a folder's (or a `builtin:` model's) README.md, or the HF cache; None when unknown."""
    if reference is None:
        return None
    if is_builtin(reference):
        from stillhouse.models import resolve_model

        reference = resolve_model(reference, "model")
    folder = Path(reference).expanduser()
    if folder.is_dir():
        readme = folder / "README.md"
        return license_from_front_matter(readme.read_text(errors="replace")) if readme.is_file() else None
    try:  # a Hub id downloaded before: its cached README, never the network
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(reference, "README.md")
    except Exception:  # not a valid repo id: nothing cached to read
        return None
    return license_from_front_matter(Path(cached).read_text(errors="replace")) if isinstance(cached, str) else None


@dataclass
class Violation:
    message: str
    clause: Clause | None

    def __str__(self) -> str:
        return self.message + (f"\n    {self.clause.quote()}" if self.clause else "")


@dataclass
class LicenseCheck:
    """The outcome of checking a student against its teacher's and base model's terms."""

    student_license: str
    teacher_license: str | None
    base_model_license: str | None
    violations: list[Violation] = field(default_factory=list)
    obligations: list[str] = field(default_factory=list)  # what the card must say (attribution, policies to pass on)

    @property
    def ok(self) -> bool:
        return not self.violations

    def report(self) -> str:
        return "\n".join(f"  - {violation}" for violation in self.violations)

    def enforce(self, override: str | None, where: str = "publish") -> None:
        """Raise `LicenseError` quoting each broken clause, unless ``override`` gives a reason."""
        if self.violations and not override:
            raise LicenseError(
                f"{where}: the student can't be published under these license terms:\n{self.report()}\n"
                "Fix publish.license / publish.repo_id (or train.student), declare the right license in publish.teacher_license / "
                "publish.base_model_license, or, having read the terms, set publish.license_override to your reason "
                "(it is written into the model card)."
            )


def _name_starts_with(repo_id: str, prefix: str) -> bool:
    """ "Llama 3" matches "Llama-3-tiny", "llama3_tiny" and "LLaMA 3 tiny": case, spaces and separators don't count."""

    def squash(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    return squash(repo_id.split("/")[-1]).startswith(squash(prefix))


def check_licenses(
    student_license: str,
    repo_id: str | None,
    teacher_license: str | None,
    base_model_license: str | None,
    *,
    has_base_model: bool,
    teacher_name: str = "",
    base_model_name: str = "",
) -> LicenseCheck:
    """Check the student's declared license and repo name against its teacher's and base model's terms.

    ``teacher_license`` None means unknown (a violation: it can't be checked); ``base_model_license``
    None is unknown only when ``has_base_model`` (a student trained from scratch has no base model).
    """
    student_id = normalise_license_id(student_license)
    check = LicenseCheck(student_id, teacher_license, base_model_license)
    student = LICENSES.get(student_id)
    if student is None:
        check.violations.append(
            Violation(
                f"publish.license {student_license!r} is not in Stillhouse's license table ({known_ids()}); its terms can't be checked",
                None,
            )
        )
    roles = [("teacher", teacher_name, teacher_license, "publish.teacher_license")]
    if has_base_model:
        roles.append(("base model", base_model_name, base_model_license, "publish.base_model_license"))
    for role, model_name, license_id, field_name in roles:
        who = f"{role} {model_name}".strip()  # "teacher Qwen/Qwen2.5-1.5B-Instruct"
        if license_id is None:
            check.violations.append(
                Violation(
                    f"the license of {who} is unknown (no {field_name} in the config and no `license:` in a local README.md); "
                    f"set {field_name} to its license id",
                    None,
                )
            )
            continue
        terms = LICENSES.get(normalise_license_id(license_id))
        if terms is None:
            check.violations.append(
                Violation(
                    f"{field_name} {license_id!r} ({who}) is not in Stillhouse's license table ({known_ids()}); "
                    "its terms can't be checked",
                    None,
                )
            )
            continue
        derivative = role == "base model" or terms.outputs_make_derivatives
        how = (
            "a derivative of"
            if role == "base model"
            else ("a derivative (trained on the outputs) of" if derivative else "trained on the outputs of")
        )
        if derivative and terms.derivative_licenses is not None and student_id not in terms.derivative_licenses:
            check.violations.append(
                Violation(
                    f"the student is {how} {who} ({terms.name}), so it must carry "
                    f"{' or '.join(sorted(terms.derivative_licenses))}, not publish.license {student_id!r}",
                    terms.clauses.get("derivatives"),
                )
            )
        if not terms.commercial and student is not None and student.commercial:
            check.violations.append(
                Violation(
                    f"{who} is under {terms.name}, which allows non-commercial use only, but publish.license {student_id!r} "
                    "allows commercial use; pick a non-commercial license (e.g. cc-by-nc-4.0)",
                    terms.clauses.get("non_commercial"),
                )
            )
        if (
            role == "teacher"
            and terms.outputs_only_improve is not None
            and (base_model_license or "") not in terms.outputs_only_improve
        ):
            check.violations.append(
                Violation(
                    f"{terms.name} forbids using {model_name or 'the teacher'}'s outputs to improve other language models, and the student "
                    f"({'from scratch' if not has_base_model else f'base model under {base_model_license}'}) is not a "
                    f"{' / '.join(sorted(terms.outputs_only_improve))} model",
                    terms.clauses.get("outputs"),
                )
            )
        passed_on = len(check.obligations)
        if terms.name_prefix and (derivative or terms.naming_covers_outputs):
            if repo_id is None:
                check.obligations.append(
                    f"Name: a published copy's name must start with “{terms.name_prefix}” ({who}: {terms.name})."
                )
            elif not _name_starts_with(repo_id, terms.name_prefix):
                check.violations.append(
                    Violation(
                        f"the student is {how} {who} ({terms.name}), so its name must start with “{terms.name_prefix}”; "
                        f"rename publish.repo_id {repo_id!r} (e.g. {repo_id.split('/')[0]}/{terms.name_prefix.replace(' ', '-')}-{repo_id.split('/')[-1]})",
                        terms.clauses.get("name_prefix"),
                    )
                )
        if terms.attribution and (derivative or terms.naming_covers_outputs or "attribution" in terms.clauses):
            check.obligations.append(f"{terms.attribution}. ({who[0].upper() + who[1:]}: {terms.name}, {terms.url})")
        # The teacher's use policy and non-commercial terms are passed on even where the student is not its
        # derivative: where a license leaves room for a model trained on its outputs, take the stricter reading.
        if terms.use_policy:
            check.obligations.append(
                f"Use of this model is subject to {terms.use_policy}, passed on from the {who} ({terms.name})."
            )
        if not terms.commercial:
            check.obligations.append(f"Non-commercial use only, passed on from the {who} ({terms.name}, {terms.url}).")
        if "notice" in terms.clauses or len(check.obligations) == passed_on:
            # Every model's own terms are named, the teacher's too: the card's list is the union of both roles.
            check.obligations.append(
                f"The {who} is licensed under {terms.name} ({terms.url})"
                + ("." if derivative else "; the student was trained on its outputs.")
            )
    check.obligations = list(dict.fromkeys(check.obligations))
    return check


def check_pipeline_licenses(config) -> LicenseCheck:
    """`check_licenses` for a PipelineConfig: the ids from `publish`, else from the models' local README front matter.

    The models are named by their public names (`stillhouse.public_names`): these messages and duties are
    written into the model card.
    """
    from stillhouse.public_names import public_names

    publish, base_model = config.publish, config.train.student
    names = public_names(config)
    teacher_license = publish.teacher_license or local_model_license(config.sample.teacher)
    base_model_license = publish.base_model_license or local_model_license(base_model)
    return check_licenses(
        publish.license,
        publish.repo_id,
        teacher_license,
        base_model_license,
        has_base_model=base_model is not None,
        teacher_name=names.teacher,
        base_model_name=names.base_model or "",
    )


def preflight_licenses(config) -> LicenseCheck:
    """Before any stage: a push (publish.repo_id set) that the license terms forbid fails now, not after training."""
    check = check_pipeline_licenses(config)
    if config.publish.repo_id:
        check.enforce(config.publish.license_override, where="preflight")
    return check
