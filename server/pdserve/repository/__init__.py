"""The model repository: config parsing and validation, and the manager that loads models."""
