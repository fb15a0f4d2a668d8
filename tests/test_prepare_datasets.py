"""dataset/ preparation scripts on small raw-format samples written here: exact output rows, the
clicks-only and most-recent rules, chunked reading against a plain reference, clear errors for
damaged lines, nothing half-written, and output that RecBole loads."""

import csv
import os
import random
import re
from pathlib import Path

import pytest

from dataset import kuairand, recent_events
from dataset.prepare import main as prepare_main

KUAIRAND_HEADER = "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,tab"

# Three log files as KuaiRand-1K lays them out. User 30 has 5 clicks (more than the cap of 3 used
# below) spread over all three files, out of time order within a file; impressions (is_click 0)
# are the most recent rows of users 30 and 5; users 5 and 30 each have two clicks at the same
# time_ms (file order decides). User 12 only has impressions, so it disappears.
KUAIRAND_LOGS = {
    "log_standard_4_08_to_4_21_1k.csv": [
        "30,5001,20220409,1000,1649469600000,1,0,0,1",
        "5,5002,20220408,900,1649379600000,1,0,0,1",
        "30,5003,20220408,800,1649376000000,1,0,0,1",
        "12,5001,20220410,700,1649545200000,0,0,0,1",
        "5,5004,20220408,900,1649379600000,1,0,0,1",
        "30,5002,20220420,2300,1650466800000,0,0,0,1",
    ],
    "log_standard_4_22_to_5_08_1k.csv": [
        "30,5004,20220423,1200,1650686400250,1,1,0,1",
        "30,5005,20220422,1200,1650600000000,1,0,0,1",
        "5,5006,20220507,2100,1651928400000,0,0,0,1",
    ],
    "log_random_4_22_to_5_08_1k.csv": [
        "30,5006,20220423,1200,1650686400250,1,0,0,0",
        "5,5007,20220501,800,1651363200000,1,0,0,0",
        "30,5007,20220508,2000,1652011200000,0,0,0,0",
    ],
}


def write_kuairand(folder, logs=KUAIRAND_LOGS, header=KUAIRAND_HEADER, features=True):
    data = Path(folder) / "data"
    data.mkdir(parents=True)
    for name, rows in logs.items():
        (data / name).write_text("\n".join([header, *rows]) + "\n")
    if features:
        (data / "user_features_1k.csv").write_text(
            "user_id,user_active_degree,follow_user_num,onehot_feat0\n5,high_active,3,1\n12,UNKNOWN,0,0\n"
            "30,full_active,250,0\n")
        (data / "video_features_basic_1k.csv").write_text(
            "video_id,author_id,video_type,video_duration,tag\n5001,11,NORMAL,17200.0,\"12,65\"\n"
            "5004,14,AD,8000.0,3\n5099,19,NORMAL,100.0,1\n")
    return str(folder)


def read(path):
    return Path(path).read_text().splitlines()


def prepare(*args):
    assert prepare_main([*args, "--quiet"]) == 0


def test_kuairand_keeps_each_users_most_recent_clicks_with_remapped_ids(tmp_path):
    raw = write_kuairand(tmp_path / "KuaiRand-1K")
    out = tmp_path / "out"
    prepare("kuairand", "--raw_dir", raw, "--out_dir", str(out), "--max_events_per_user", "3")
    folder = out / "kuairand-1k"
    assert sorted(os.listdir(out)) == ["kuairand-1k"]  # nothing else left beside it
    # Users 5 -> 1, 30 -> 2; the videos that survive, 5002 5004 5005 5006 5007 -> 1..5.
    # User 30's clicks by time: 5003 (4-08), 5001 (4-09), 5005 (4-22), then 5006 and 5004 at the
    # same ms (log_random is read before log_standard of the same period); the cap keeps the last
    # three. User 5: 5002 and 5004 at the same time (file order), then 5007; 5006 was not clicked.
    assert read(folder / "kuairand-1k.inter") == [
        "user_id:token\titem_id:token\ttimestamp:float",
        "1\t1\t1649379600.000",
        "1\t2\t1649379600.000",
        "1\t5\t1651363200.000",
        "2\t3\t1650600000.000",
        "2\t4\t1650686400.250",
        "2\t2\t1650686400.250",
    ]
    assert read(folder / "kuairand-1k.user") == [
        "user_id:token\traw_user_id:token\tuser_active_degree:token\tfollow_user_num:float\tonehot_feat0:token",
        "1\t5\thigh_active\t3\t1",
        "2\t30\tfull_active\t250\t0",
    ]
    assert read(folder / "kuairand-1k.item") == [
        "item_id:token\traw_item_id:token\tauthor_id:token\tvideo_type:token\tvideo_duration:float\ttag:token_seq",
        "1\t5002\t\t\t\t",
        "2\t5004\t14\tAD\t8000.0\t3",
        "3\t5005\t\t\t\t",
        "4\t5006\t\t\t\t",
        "5\t5007\t\t\t\t",
    ]


def test_kuairand_without_cap_or_random_logs(tmp_path):
    raw = write_kuairand(tmp_path / "raw", features=False)
    out = tmp_path / "out"
    prepare("kuairand", "--raw_dir", raw, "--out_dir", str(out), "--no_random_logs", "--name", "kr")
    # Clicked videos 5001..5005 -> 1..5. User 30 keeps all 4 clicks; 5006/5007 came from log_random.
    assert read(out / "kr" / "kr.inter")[1:] == [
        "1\t2\t1649379600.000",
        "1\t4\t1649379600.000",
        "2\t3\t1649376000.000",
        "2\t1\t1649469600.000",
        "2\t5\t1650600000.000",
        "2\t4\t1650686400.250",
    ]
    assert read(out / "kr" / "kr.item") == ["item_id:token\traw_item_id:token", "1\t5001", "2\t5002", "3\t5003",
                                            "4\t5004", "5\t5005"]
    assert read(out / "kr" / "kr.user") == ["user_id:token\traw_user_id:token", "1\t5", "2\t30"]


def reference_recent_clicks(paths, cap):
    """The plain way: every row in memory, a sort per user, the last ``cap`` clicks."""
    per_user, position = {}, 0
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["is_click"] == "1":
                    per_user.setdefault(int(row["user_id"]), []).append(
                        (int(row["time_ms"]), position, int(row["video_id"])))
                position += 1
    kept = {user: sorted(events)[-cap:] for user, events in per_user.items()}
    items = sorted({video for events in kept.values() for _, _, video in events})
    item_token = {video: i + 1 for i, video in enumerate(items)}
    rows = []
    for user_token, user in enumerate(sorted(kept), start=1):
        rows += [f"{user_token}\t{item_token[video]}\t{time / 1000:.3f}" for time, _, video in kept[user]]
    return rows


def test_chunked_reading_matches_the_plain_reference(tmp_path, monkeypatch):
    rng = random.Random(7)
    logs = {name: [f"{rng.randrange(15)},{rng.randrange(40)},20220410,1200,"
                   f"{1649500000000 + rng.randrange(300) * 1000},{int(rng.random() < 0.6)},0,0,1"
                   for _ in range(700)] for name in KUAIRAND_LOGS}
    raw = write_kuairand(tmp_path / "raw", logs=logs, features=False)
    monkeypatch.setattr(recent_events, "MIN_COMPACTION_ROWS", 50)  # compact (and cut) many times
    prepare("kuairand", "--raw_dir", raw, "--out_dir", str(tmp_path / "out"), "--max_events_per_user", "20",
            "--chunk_rows", "37")
    _, paths = kuairand.find_logs(raw)
    expected = reference_recent_clicks(paths, cap=20)
    assert read(tmp_path / "out" / "kuairand-1k" / "kuairand-1k.inter")[1:] == expected
    assert len(expected) < sum(len(rows) for rows in logs.values()) * 0.6  # the cap did cut


@pytest.mark.parametrize(
    "log_rows, message",
    [
        (["30,5001,20220409,1000,1649469600000,1,0,0,1,7"], r"log_standard_4_08_to_4_21_1k\.csv: Expected 9 fields in line 3, saw 10"),
        (["30,50x1,20220409,1000,1649469600000,1,0,0,1"], r"log_standard_4_08_to_4_21_1k\.csv, line 3, column video_id: '50x1' is not an integer"),
        (["30,5001,20220409,1000,,1,0,0,1"], r"line 3, column time_ms: an empty field is not an integer"),
        (["30,5001,20220409,1000,1649469600000,2,0,0,1"], r"line 3, column is_click: 2 is not 0 or 1"),
        ([""], r"line 3, column is_click: an empty field is not an integer"),
    ],
)
def test_damaged_lines_are_clear_errors_and_nothing_is_written(tmp_path, capsys, log_rows, message):
    logs = dict(KUAIRAND_LOGS)
    name = "log_standard_4_08_to_4_21_1k.csv"
    logs[name] = [logs[name][0], *log_rows, *logs[name][1:]]
    raw = write_kuairand(tmp_path / "raw", logs=logs)
    out = tmp_path / "out"
    out.mkdir()
    assert prepare_main(["kuairand", "--raw_dir", raw, "--out_dir", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "--on_bad_lines=skip" in err
    assert re.search(message, err), err
    assert os.listdir(out) == []  # no dataset folder, no temporary folder

    # Skipping them gives the output of the clean logs, and says what was skipped.
    prepare("kuairand", "--raw_dir", raw, "--out_dir", str(out), "--on_bad_lines", "skip", "--name", "kr")
    clean = write_kuairand(tmp_path / "clean")
    prepare("kuairand", "--raw_dir", clean, "--out_dir", str(out), "--name", "clean")
    assert read(out / "kr" / "kr.inter") == read(out / "clean" / "clean.inter")
    assert "skipped 1 bad line(s) of " in capsys.readouterr().err


def test_failure_while_writing_leaves_nothing(tmp_path, capsys):
    # The logs are fine; the user features file (read after the .inter file is written) is not.
    raw = write_kuairand(tmp_path / "raw")
    features = Path(raw) / "data" / "user_features_1k.csv"
    features.write_text(features.read_text() + "x7,high_active,3,1\n")
    out = tmp_path / "out"
    assert prepare_main(["kuairand", "--raw_dir", raw, "--out_dir", str(out), "--quiet"]) == 2
    assert "user_features_1k.csv, line 5, column user_id: 'x7' is not an integer" in capsys.readouterr().err
    assert os.listdir(out) == []


def test_missing_column_and_missing_files_are_clear_errors(tmp_path, capsys):
    raw = write_kuairand(tmp_path / "raw", header=KUAIRAND_HEADER.replace("is_click", "click"))
    assert prepare_main(["kuairand", "--raw_dir", raw, "--out_dir", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "log_standard_4_08_to_4_21_1k.csv has no column(s) is_click (its header has: user_id," in err
    assert prepare_main(["kuairand", "--raw_dir", str(tmp_path), "--quiet"]) == 2
    assert "No KuaiRand log files" in capsys.readouterr().err
    assert prepare_main(["lfm1b", "--raw_dir", str(tmp_path), "--quiet"]) == 2
    assert "No LFM-1b_LEs.txt in" in capsys.readouterr().err


def test_existing_dataset_is_replaced_only_when_asked(tmp_path, capsys):
    raw = write_kuairand(tmp_path / "raw", features=False)
    out = tmp_path / "out"
    prepare("kuairand", "--raw_dir", raw, "--out_dir", str(out), "--max_events_per_user", "1")
    assert prepare_main(["kuairand", "--raw_dir", raw, "--out_dir", str(out), "--quiet"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert len(read(out / "kuairand-1k" / "kuairand-1k.inter")) == 1 + 2  # untouched: one click per user
    prepare("kuairand", "--raw_dir", raw, "--out_dir", str(out), "--overwrite")
    assert len(read(out / "kuairand-1k" / "kuairand-1k.inter")) == 1 + 8  # all clicks
    assert sorted(os.listdir(out)) == ["kuairand-1k"]


# LFM-1b_LEs.txt: user, artist, album, track, timestamp; no header; not in time order. User 44's two
# most recent events share a timestamp (file order decides); user 31435741 listens to track 4 twice.
LFM1B_EVENTS = [
    "31435741\t2\t4\t4\t1385212958",
    "31435741\t2\t4\t4\t1385212900",
    "44\t10\t20\t30\t1390000000",
    "31435741\t3\t5\t6\t1385213000",
    "44\t11\t21\t31\t1380000000",
    "44\t10\t22\t33\t1390000000",
]


@pytest.mark.parametrize("item, column", [("album", 2), ("track", 3), ("artist", 1)])
def test_lfm1b_most_recent_listening_events(tmp_path, item, column):
    raw = tmp_path / "LFM-1b"
    raw.mkdir()
    (raw / "LFM-1b_LEs.txt").write_text("\n".join(LFM1B_EVENTS) + "\n")
    out = tmp_path / "out"
    prepare("lfm1b", "--raw_dir", str(raw), "--out_dir", str(out), "--item", item, "--max_events_per_user", "2")
    name = f"lfm1b-{item}s"
    fields = [line.split("\t") for line in LFM1B_EVENTS]
    kept = [fields[2], fields[5], fields[0], fields[3]]  # user 44: rows 3, 6; user 31435741: rows 1, 4
    items = sorted({int(row[column]) for row in kept})
    assert read(out / name / f"{name}.inter") == ["user_id:token\titem_id:token\ttimestamp:float"] + [
        f"{1 if row[0] == '44' else 2}\t{items.index(int(row[column])) + 1}\t{row[4]}" for row in kept]
    assert read(out / name / f"{name}.user") == ["user_id:token\traw_user_id:token", "1\t44", "2\t31435741"]
    assert read(out / name / f"{name}.item")[1:] == [f"{i + 1}\t{raw_id}" for i, raw_id in enumerate(items)]
    if item == "album":  # spelled out once: albums 4, 5, 20, 22 -> 1..4
        assert read(out / name / f"{name}.inter")[1:] == [
            "1\t3\t1390000000", "1\t4\t1390000000", "2\t1\t1385212958", "2\t2\t1385213000"]


def test_lfm1b_bad_timestamp_names_the_line(tmp_path, capsys):
    raw = tmp_path / "LFM-1b"
    raw.mkdir()
    (raw / "LFM-1b_LEs.txt").write_text("\n".join([*LFM1B_EVENTS[:4], "44\t10\t20\t30\t2014-01-01"]) + "\n")
    assert prepare_main(["lfm1b", "--raw_dir", str(raw), "--out_dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert "LFM-1b_LEs.txt, line 5, column timestamp: '2014-01-01' is not an integer" in capsys.readouterr().err


# Last.fm-1K: newest first per user, quotes in names, tracks without MusicBrainz ids (items by name).
LASTFM_EVENTS = [
    'user_000002\t2009-05-04T23:08:57Z\tart-A\tThe "Quoted" Band\ttr-1\tSong "One"',
    "user_000002\t2009-05-04T13:54:10Z\t\tNo Mbid Artist\t\tUntitled",
    'user_000001\t2009-05-04T23:08:57Z\tart-A\tThe "Quoted" Band\ttr-1\tSong "One" (other title)',
    "user_000001\t2008-01-01T00:00:00Z\t\tNo Mbid Artist\t\tUntitled",
    "user_000002\t2009-05-03T10:00:00Z\tart-B\tOther\t\tUntitled",
]


def write_lastfm(folder, events=LASTFM_EVENTS):
    raw = Path(folder) / "lastfm-dataset-1K"
    raw.mkdir(parents=True)
    (raw / "userid-timestamp-artid-artname-traid-traname.tsv").write_text("\n".join(events) + "\n")
    return str(folder)


def test_lastfm1k_tracks_by_mbid_or_name(tmp_path):
    out = tmp_path / "out"
    prepare("lastfm1k", "--raw_dir", write_lastfm(tmp_path / "raw"), "--out_dir", str(out))
    # Users and items numbered in order of first appearance: user_000002 -> 1, user_000001 -> 2;
    # tr-1 -> 1, (No Mbid Artist, Untitled) -> 2, (Other, Untitled) -> 3.
    assert read(out / "lastfm-1k" / "lastfm-1k.inter") == [
        "user_id:token\titem_id:token\ttimestamp:float",
        "1\t3\t1241344800", "1\t2\t1241445250", "1\t1\t1241478537",
        "2\t2\t1199145600", "2\t1\t1241478537",
    ]
    assert read(out / "lastfm-1k" / "lastfm-1k.user") == [
        "user_id:token\traw_user_id:token", "1\tuser_000002", "2\tuser_000001"]
    assert read(out / "lastfm-1k" / "lastfm-1k.item") == [
        "item_id:token\traw_item_id:token\tartist_name:token\ttrack_name:token",
        '1\ttr-1\t"The ""Quoted"" Band"\t"Song ""One"""',  # RecBole reads atomic files with csv quoting
        "2\t\tNo Mbid Artist\tUntitled",
        "3\t\tOther\tUntitled",
    ]


def test_lastfm1k_artists_and_cap(tmp_path):
    out = tmp_path / "out"
    prepare("lastfm1k", "--raw_dir", write_lastfm(tmp_path / "raw"), "--out_dir", str(out), "--item", "artist",
            "--max_events_per_user", "1")
    assert read(out / "lastfm-1k-artists" / "lastfm-1k-artists.inter")[1:] == ["1\t1\t1241478537", "2\t1\t1241478537"]
    assert read(out / "lastfm-1k-artists" / "lastfm-1k-artists.item")[1:] == ['1\tart-A\t"The ""Quoted"" Band"']


def test_lastfm1k_bad_timestamp_names_the_line(tmp_path, capsys):
    raw = write_lastfm(tmp_path / "raw", [*LASTFM_EVENTS[:2], "user_000003\t04/05/2009\t\tX\t\tY"])
    assert prepare_main(["lastfm1k", "--raw_dir", raw, "--out_dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert "line 3, column timestamp: '04/05/2009' is not a time like 2009-04-08T01:57:47Z" in capsys.readouterr().err


def test_prepared_datasets_load_with_recbole(tmp_path):
    from recbole.data import create_dataset

    from recbole_mamba.quick_start import create_config

    out = tmp_path / "out"
    prepare("kuairand", "--raw_dir", write_kuairand(tmp_path / "kr"), "--out_dir", str(out))
    prepare("lastfm1k", "--raw_dir", write_lastfm(tmp_path / "lfm"), "--out_dir", str(out))
    settings = {"data_path": str(out), "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
                "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "artist_name"]}}

    dataset = create_dataset(create_config("Mamba4Rec", "lastfm-1k", config_dict=settings))
    assert (dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num) == (2, 3, 5)
    artist = dataset.item_feat["artist_name"][dataset.token2id("item_id", "1")]
    assert dataset.id2token("artist_name", int(artist)) == 'The "Quoted" Band'

    settings["load_col"] = {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "video_type"],
                            "user": ["user_id", "user_active_degree"]}
    dataset = create_dataset(create_config("Mamba4Rec", "kuairand-1k", config_dict=settings))
    assert (dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num) == (2, 7, 8)
    # User 30 (token 2) under RecBole's time-ordered leave-one-out split: its last click (5004, tied
    # in time with 5006 and after it in the raw files) is the test target, 5006 the validation one,
    # and the training targets are the earlier clicks in time order.
    raw_video = dict(line.split("\t")[:2] for line in read(out / "kuairand-1k" / "kuairand-1k.item")[1:])
    user = dataset.token2id("user_id", "2")
    targets = []
    for part in dataset.build():
        feat = part.inter_feat
        items = feat["item_id"][feat["user_id"] == user]
        targets.append([raw_video[token] for token in dataset.id2token("item_id", items)])
    assert targets == [["5001", "5005"], ["5006"], ["5004"]]  # 5003, the first click, is only history
