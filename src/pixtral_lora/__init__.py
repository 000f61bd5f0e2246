"""pixtral-lora: local LoRA/QLoRA fine-tuning of Pixtral-12B for image classification."""

__version__ = "0.1.0"
