"""The BentoML service and the `noisewise` command line."""
