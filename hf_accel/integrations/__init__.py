"""Hooks into the libraries users already call: transformers and diffusers. Installed on `import hf_accel`."""
