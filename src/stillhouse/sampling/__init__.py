"""Teacher sampling: the engine protocol (engine.py), the hf, vllm and openai engines, and the teacher-output store."""
