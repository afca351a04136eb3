"""Training configs: `python -m var_jax train --config configs/NAME.py[:ARGS]`."""
