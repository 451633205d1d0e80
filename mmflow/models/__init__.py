"""Model sources shared by stages: ``clip`` (open_clip models with their preprocessing and tokenizer)."""
