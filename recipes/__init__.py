"""The recipes and accelerate configs that ship with gqa: `gqa recipes` lists them, `gqa train NAME` runs one."""
