"""hf_accel's first-party plugins, one package per family. Each is registered through the `hf_accel.plugins`
entry-point group in pyproject.toml, exactly like a third-party plugin; the core never imports them by name."""
