"""Scientific QA evaluation of checkpoints: tasks, scoring, reports."""
