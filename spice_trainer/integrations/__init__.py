"""Integrations with the Hugging Face training stack (transformers `Trainer`, TRL `SFTTrainer`)."""
