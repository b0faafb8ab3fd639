"""Runtime plugins: how the (possibly rewritten) weights are executed inside generate()."""
