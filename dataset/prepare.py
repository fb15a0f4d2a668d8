"""Turn public raw lifelong-recommendation datasets into RecBole atomic files.

    python -m dataset.prepare kuairand --raw_dir KuaiRand-27K --max_events_per_user 10000
    python -m dataset.prepare lfm1b    --raw_dir LFM-1b --item track
    python -m dataset.prepare lastfm1k --raw_dir lastfm-dataset-1K

Run from the repository root. Output: <out_dir>/<name>/<name>.inter (+ .user, .item), where out_dir
defaults to dataset/, RecBole's default data_path, so that afterwards
    python run_recbole_mamba.py --model=Mamba4Rec --dataset=<name>
reads it. See dataset/README.md for the download links, licences and what each step keeps.
Exit status: 0 on success, 2 for raw files that cannot be prepared (the message says why).
"""

import argparse
import sys

from dataset.raw_files import ON_BAD_LINES, PreparationError

DEFAULT_OUT_DIR = "dataset"


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m dataset.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = parser.add_subparsers(dest="source", required=True, metavar="{kuairand,lfm1b,lastfm1k}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--raw_dir", required=True, help="folder holding the unpacked raw files")
    common.add_argument("--out_dir", default=DEFAULT_OUT_DIR, help="where <name>/<name>.inter is written "
                        f"(default: {DEFAULT_OUT_DIR}/, RecBole's default data_path)")
    common.add_argument("--name", help="dataset name (default: kuairand-27k, lfm1b-tracks, lastfm-1k, ...)")
    common.add_argument("--max_events_per_user", type=positive_int,
                        help="keep only each user's most recent N events (default: all)")
    common.add_argument("--overwrite", action="store_true", help="replace an existing <out_dir>/<name>")
    common.add_argument("--on_bad_lines", choices=ON_BAD_LINES, default="error",
                        help="a damaged raw line stops with an error naming it (default), or is skipped and counted")
    common.add_argument("--chunk_rows", type=positive_int, help="raw lines read at a time (default: 1,000,000)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")

    kuairand = sources.add_parser("kuairand", parents=[common], help="KuaiRand-27K / KuaiRand-1K: clicks only")
    kuairand.add_argument("--no_random_logs", action="store_true",
                          help="leave out log_random_* (the randomly exposed videos)")
    lfm1b = sources.add_parser("lfm1b", parents=[common], help="LFM-1b listening events")
    lfm1b.add_argument("--item", choices=("track", "album", "artist"), default="track")
    lastfm1k = sources.add_parser("lastfm1k", parents=[common], help="Last.fm-1K listening events")
    lastfm1k.add_argument("--item", choices=("track", "artist"), default="track")
    return parser.parse_args(argv)


def run(args):
    """Prepare the dataset ``args`` describe; returns the folder written."""
    options = dict(name=args.name, max_events_per_user=args.max_events_per_user, overwrite=args.overwrite,
                   chunk_rows=args.chunk_rows, on_bad_lines=args.on_bad_lines, progress=not args.quiet,
                   log=lambda line: print(line, file=sys.stderr))
    if args.source == "kuairand":
        from dataset import kuairand

        return kuairand.prepare(args.raw_dir, args.out_dir, include_random=not args.no_random_logs, **options)
    if args.source == "lfm1b":
        from dataset import lfm1b

        return lfm1b.prepare(args.raw_dir, args.out_dir, item=args.item, **options)
    from dataset import lastfm1k

    return lastfm1k.prepare(args.raw_dir, args.out_dir, item=args.item, **options)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except PreparationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
