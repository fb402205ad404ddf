"""Files other tools read: PEFT adapters, Hugging Face model directories, tokenizer files and model cards."""
