"""What is measured or looked up: the GPU catalogue and the model catalogue."""
