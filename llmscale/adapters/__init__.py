"""Parameter-efficient fine-tuning: adapters applied to a built model from outside."""
