"""Weight quantization plugins."""
