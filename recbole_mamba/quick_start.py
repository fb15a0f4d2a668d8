"""``run()``: config -> dataset -> dataloaders -> model -> trainer -> results, as RecBole's ``run_recbole``.

Works for the plugin's models and for any RecBole model, so both are trained and evaluated by the
same code. All input checks run before anything is written (log folder, checkpoints).
"""

import logging
import sys

from recbole.data.transform import construct_transform
from recbole.utils import get_environment, get_flops, init_logger, init_seed, set_color

from recbole_mamba.checkpoint import load_checkpoint
from recbole_mamba.config import Config, add_missing_defaults, get_model
from recbole_mamba.data.checks import check_dataset_files
from recbole_mamba.data.loading import load_dataset, prepare_dataloaders
from recbole_mamba.provenance import describe_run
from recbole_mamba.trainer import get_trainer, read_resume_checkpoint


def create_config(model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=()):
    """Build and check a :class:`~recbole_mamba.config.Config`; raises ``UserInputError`` on bad input."""
    config = Config(model, dataset, config_file_list, config_dict, cmd_args)
    check_dataset_files(config)
    if config["resume"]:
        read_resume_checkpoint(config["resume"], config)
    return config


def _init_logging(config):
    # RecBole's init_logger calls logging.basicConfig, which is a no-op once the root logger has
    # handlers: drop the previous run's handlers so every run gets its own log file.
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    init_logger(config)
    return root


def count_trainable_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def format_results(best_valid_result, test_result, valid_metric):
    """A small table of validation (at the best epoch) and test metrics."""
    rows = [f"{'metric':<12}{'valid':>10}{'test':>10}"]
    for metric, test_value in test_result.items():
        valid_value = best_valid_result.get(metric, float("nan"))
        rows.append(f"{metric:<12}{valid_value:>10.4f}{test_value:>10.4f}")
    title = f"Results (model selected on validation {valid_metric}):"
    return "\n".join([title, *rows])


def run(
    model=None,
    dataset=None,
    config_file_list=None,
    config_dict=None,
    cmd_args=(),
    saved=True,
    callback_fn=None,
    evaluate_test=True,
):
    """Train ``model`` on ``dataset`` with RecBole's Trainer and evaluate it by full ranking.

    Args:
        model: a model name (``"Mamba4Rec"``, ``"SASRec"``, ...) or class.
        dataset: a dataset name (a folder under ``data_path``, or one RecBole can download).
        config_file_list: YAML files with settings.
        config_dict: settings as a dict (overrides the files).
        cmd_args: ``--key=value`` strings (override everything else).
        saved: keep the best checkpoint (and the resumable '-last.pth' one) and evaluate the best
            model on the test split. ``config_dict={"resume": path}`` continues an interrupted run
            from its '-last.pth' checkpoint.
        callback_fn: called as ``callback_fn(epoch_idx, valid_score)`` after each validation
            (RecBole's ``Trainer.fit`` hook; a hyperparameter search reports through it).
        evaluate_test: False leaves the test split unseen (``test_result`` is then None): a
            search selects on validation alone and evaluates only its best configuration.

    Returns:
        dict with ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``,
        ``test_result``, ``model_file``, ``last_model_file`` (the resumable checkpoint) and
        ``trainable_parameters``.
    """
    config = create_config(model, dataset, config_file_list, config_dict, cmd_args)

    logger = _init_logging(config)
    logger.info(sys.argv)
    logger.info(config)
    logger.info(describe_run(config))

    data, (train_data, valid_data, test_data), recommender = build_data_and_model(config)
    logger.info(data)
    logger.info(recommender)
    n_params = count_trainable_parameters(recommender)
    logger.info(set_color("Trainable parameters", "blue") + f": {n_params:,} ({config['model']})")
    transform = construct_transform(config)
    flops = get_flops(recommender, data, config["device"], logger, transform)
    logger.info(set_color("FLOPs", "blue") + f": {flops}")

    trainer = get_trainer(config)(config, recommender)
    if config["resume"]:
        trainer.resume_checkpoint(config["resume"])
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"], callback_fn=callback_fn
    )
    if not evaluate_test:
        logger.info(set_color("best valid ", "yellow") + f": {dict(best_valid_result)}")
        return _result(best_valid_score, best_valid_result, None, config, trainer, saved, n_params)
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])

    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {dict(best_valid_result)}")
    logger.info(set_color("test result", "yellow") + f": {dict(test_result)}")
    logger.info(format_results(best_valid_result, test_result, config["valid_metric"]))
    return _result(best_valid_score, best_valid_result, test_result, config, trainer, saved, n_params)


def build_data_and_model(config):
    """Dataset, (train, valid, test) dataloaders and model for ``config``, seeded as RecBole seeds them.

    Returns:
        ``(dataset, (train_data, valid_data, test_data), model)``, the model on ``config["device"]``.
    """
    init_seed(config["seed"], config["reproducibility"])
    data = load_dataset(config)
    loaders = prepare_dataloaders(config, data)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = config.model_class(config, loaders[0]._dataset).to(config["device"])
    return data, loaders, model


def _result(best_valid_score, best_valid_result, test_result, config, trainer, saved, n_params):
    return {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "model_file": trainer.saved_model_file if saved else None,
        "last_model_file": getattr(trainer, "last_model_file", None) if saved else None,
        "trainable_parameters": n_params,
    }


def load_data_and_model(model_file, map_location=None, trust_checkpoint=False):
    """Rebuild config, data and trained model from a checkpoint, as RecBole's function of that name.

    The checkpoint is read with ``weights_only=True`` and an allow-list (see
    :mod:`recbole_mamba.checkpoint`); ``trust_checkpoint=True`` unpickles it without those checks,
    for old checkpoints you made yourself.

    Returns:
        (config, model, dataset, train_data, valid_data, test_data)
    """
    checkpoint = load_checkpoint(model_file, map_location="cpu", trust=trust_checkpoint)
    config = add_missing_defaults(checkpoint["config"])
    if map_location is not None:
        config["device"] = map_location
    init_seed(config["seed"], config["reproducibility"])
    data = load_dataset(config)
    train_data, valid_data, test_data = prepare_dataloaders(config, data)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, data, train_data, valid_data, test_data
