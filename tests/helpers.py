"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""

from configs import default


def default_data_config(**overrides):
  """configs/default.py's data section with ``overrides`` (an unknown field is a KeyError)."""
  config = default.get_config().data
  for key, value in overrides.items():
    if key not in config:
      raise KeyError(f"unknown data config field {key!r}; fields: {sorted(config)}")
    config[key] = value
  return config
