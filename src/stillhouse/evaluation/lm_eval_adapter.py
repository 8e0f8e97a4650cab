"""Standard benchmarks through EleutherAI's lm-evaluation-harness (an optional extra: pip install 'stillhouse[eval]').

The model already loaded for evaluation is wrapped in lm_eval's `HFLM`, so nothing is loaded twice.
Named tasks (``hellaswag``, ``gsm8k``, ...) download their data from the Hub; a task YAML in
``include_path`` can point at a local file instead (``dataset_path: json`` with ``data_files``),
which is how the tests run it offline.

    from stillhouse.evaluation.lm_eval_adapter import run_lm_eval
    run_lm_eval(model, tokenizer, LmEvalConfig(tasks=["my_task"], include_path="tasks/"))
"""

from __future__ import annotations

import math

from stillhouse.config import LmEvalConfig
from stillhouse.errors import InputError


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def run_lm_eval(model, tokenizer, config: LmEvalConfig) -> dict[str, float]:
    """Run ``config.tasks`` on a loaded causal LM; returns ``{"<task>/<metric>": value}`` (stderr left out).

    A metric under lm_eval's default filter ``none`` keeps its plain name (``acc``); another filter is
    appended (``exact_match_strict-match``).
    """
    if not lm_eval_available():
        raise InputError(
            "evaluate.lm_eval needs lm-evaluation-harness: pip install 'stillhouse[eval]' "
            "(or set evaluate.lm_eval: null)"
        )
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=config.include_path)
    unknown = [task for task in config.tasks if task not in task_manager.all_tasks]
    if unknown:
        where = (
            f" or in {config.include_path}"
            if config.include_path
            else "; define custom tasks in a folder named by evaluate.lm_eval.include_path"
        )
        raise InputError(f"evaluate.lm_eval.tasks: {unknown} are not lm_eval tasks{where}")
    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size),
        tasks=list(config.tasks),
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        task_manager=task_manager,
        log_samples=False,
    )
    flat: dict[str, float] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, applied_filter = key.partition(",")
            if (
                "_stderr" in metric
                or not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not applied_filter
            ):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            flat[f"{task}/{metric if applied_filter == 'none' else f'{metric}_{applied_filter}'}"] = float(value)
    return flat
