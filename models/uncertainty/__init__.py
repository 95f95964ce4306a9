"""Pure uncertainty algorithms (torch/numpy/scipy/mapie only, no I/O): OOD scores, conformal sets,
selective classification and label-noise estimation."""
