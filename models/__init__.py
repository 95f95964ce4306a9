"""Everything that becomes one registered noisewise model version: data, networks, recipes, registry."""
