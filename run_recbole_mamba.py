"""Train and evaluate a Mamba-based or RecBole recommender.

    python run_recbole_mamba.py --model=Mamba4Rec --dataset=amazon-beauty
    python run_recbole_mamba.py --model=SASRec --dataset=ml-1m --data_path=/data --epochs=50
    python run_recbole_mamba.py          # Mamba4Rec on RecBole's bundled ml-100k: 10 all-position epochs, ~1.5 min on a CPU
    python run_recbole_mamba.py --model=Mamba4Rec --dataset=amazon-beauty --tune=yaml/tune/mamba4rec.yaml

Any RecBole setting can be given as --key=value; --config_files takes space-separated YAML files.
--resume=saved/<run>-last.pth continues an interrupted run (give the same settings as before).
Exit status: 0 on success, 2 for bad input (the message says what to change), 1 for other failures.
"""

import argparse
import sys

# Run with no model and dataset: a short Mamba4Rec training on the ml-100k copy inside RecBole's
# package, which needs no download. All-position training makes an epoch about 50x cheaper than
# RecBole's prefix training, so 10 epochs (of 64-window batches, for enough steps) fit in about
# 1.5 minutes on a 2-core CPU; any of these settings given on the command line wins.
EMBEDDED_MODEL, EMBEDDED_DATASET = "Mamba4Rec", "ml-100k"
EMBEDDED_SETTINGS = {"train_mode": "all_positions", "epochs": "10", "train_batch_size": "64"}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--model", "-m", help="model name, e.g. Mamba4Rec, SASRec, BERT4Rec, GRU4Rec")
    parser.add_argument("--dataset", "-d", help="dataset name, e.g. ml-1m, amazon-beauty")
    parser.add_argument("--config_files", help="space-separated YAML config files")
    parser.add_argument("--tune", metavar="SPACE_YAML", help="run a Ray Tune search over this space (see README)")
    args, settings = parser.parse_known_args(argv)
    if args.model is None and args.dataset is None and args.config_files is None:
        args.model, args.dataset = EMBEDDED_MODEL, EMBEDDED_DATASET
        given = {s[2:].partition("=")[0] for s in settings if s.startswith("--")}
        settings = [f"--{k}={v}" for k, v in EMBEDDED_SETTINGS.items() if k not in given] + settings
    return args, settings


def main(argv=None):
    args, settings = parse_args(sys.argv[1:] if argv is None else argv)
    from recbole_mamba import run
    from recbole_mamba.errors import DownloadError, UserInputError

    config_files = args.config_files.split() if args.config_files else None
    try:
        if args.tune:
            from recbole_mamba.tune import main as tune_main

            return tune_main(args.model, args.dataset, config_files, args.tune, settings)
        run(args.model, args.dataset, config_file_list=config_files, cmd_args=settings)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
