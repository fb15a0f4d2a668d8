"""recbole-mamba: Mamba-based sequential recommenders as a RecBole plugin.

``from recbole_mamba import run`` trains and evaluates any plugin or RecBole model;
the models themselves live in :mod:`recbole_mamba.model`.
"""

from recbole_mamba import compat

compat.apply()  # before anything of RecBole runs, in every process that imports the plugin

from recbole_mamba.quick_start import load_data_and_model, run  # noqa: E402

__version__ = "0.1.0"
__all__ = ["run", "load_data_and_model", "__version__"]
