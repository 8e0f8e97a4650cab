"""Teacher sampling: generation engines and the teacher-output store."""
