"""packtrain's terminal UI. It drives `packtrain-engine` as a separate process and never imports
torch, transformers, datasets or tokenizers, so it starts fast and survives the engine's crashes."""
