"""The one exception type for mistakes in what a user asked for (config, data, model name, checkpoint).

The CLI prints such an error as a single paragraph, without a traceback, and exits with status 2;
anything else that goes wrong is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """Bad input: a model name, config file, hyperparameter, dataset or checkpoint that cannot be used."""
