"""The one error of the data layer, in a module of its own so that every data module can raise
it without importing another (sources re-exports it: `from bigkd.data.sources import DataError`)."""


class DataError(ValueError):
  """Bad data input: a missing folder, a corrupt image, an unknown split."""
