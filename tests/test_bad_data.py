"""Damaged or unusual atomic files: each works as RecBole documents it, or stops with an error that
names the file, the line and the problem; a fuzz test checks that nothing else ever happens."""

import random
import signal

import pytest

from recbole_mamba import run
from recbole_mamba.data.loading import load_dataset, prepare_dataloaders
from recbole_mamba.errors import UserInputError
from recbole_mamba.quick_start import create_config
from tests.conftest import FAST_SETTINGS, TINY_MAMBA

HEADER = "user_id:token\titem_id:token\ttimestamp:float"
NO_FILTER = {"user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)"}


def valid_rows(users=12, items=12, per_user=8):
    """Every user rates ``per_user`` items in time order; every item is rated by ``per_user`` users,
    so the plugin's 5-core filter keeps everything."""
    rows, t = [], 880_000_000
    for u in range(1, users + 1):
        for j in random.Random(u).sample(range(per_user), per_user):
            t += 1
            rows.append(f"{u}\t{(u + j) % items + 1}\t{t}")
    return rows


def write(tmp_path, lines, name="data", raw=None):
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.inter"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load(tmp_path, name="data", **settings):
    """The data-loading stage of a run (config and file checks, RecBole's loading and filtering, the
    split); returns the numbers of users, items and interactions after filtering, and the dataloaders."""
    config = create_config(
        "Mamba4Rec", name, config_dict={**FAST_SETTINGS, **TINY_MAMBA, "data_path": str(tmp_path), **settings}
    )
    dataset = load_dataset(config)
    counts = {"users": dataset.user_num - 1, "items": dataset.item_num - 1, "interactions": dataset.inter_num}
    return counts, prepare_dataloaders(config, dataset), dataset


def fails(tmp_path, lines, *expected, raw=None, **settings):
    path = write(tmp_path, lines, raw=raw)
    with pytest.raises(UserInputError) as error:
        load(tmp_path, **settings)
    message = str(error.value)
    assert str(path) in message, message
    for text in expected:
        assert text in message, message
    return message


def test_the_valid_file_loads(tmp_path):
    write(tmp_path, [HEADER, *valid_rows()])
    counts, _, _ = load(tmp_path)
    assert counts == {"users": 12, "items": 12, "interactions": 96}


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ("5\t3\t880000500\t7", "4 field(s), but the header names 3"),  # RecBole would drop the 7
        ("5\t3", "2 field(s), but the header names 3"),  # RecBole would read a missing timestamp
        ('5\t"3\t880000500', "cannot be split into fields"),  # an unclosed quote swallows the rest
    ],
)
def test_malformed_line(tmp_path, bad_line, expected):
    rows = valid_rows()
    rows.insert(10, bad_line)  # file line 12: the header is line 1
    fails(tmp_path, [HEADER, *rows], "line 12", expected)


def test_missing_column(tmp_path):
    fails(tmp_path, ["user_id:token\titem_id:token", "1\t2"], "lacks the field(s) timestamp")


def test_unknown_column_type(tmp_path):
    fails(tmp_path, ["user_id:token\titem_id:token\ttimestamp:date", "1\t2\t3"], "line 1", "type 'date'")


@pytest.mark.parametrize("value", ["2020-01-01", "abc", "inf", "1_000"])
def test_non_numeric_timestamp(tmp_path, value):
    rows = valid_rows()
    rows[4] = f"1\t2\t{value}"
    fails(tmp_path, [HEADER, *rows], "line 6", f"timestamp is '{value}', which is not a finite number")


@pytest.mark.parametrize("value, shown", [("", "is empty"), ("NA", "is 'NA', which pandas reads as a missing value")])
def test_missing_item_id(tmp_path, value, shown):
    rows = valid_rows()
    rows[2] = f"1\t{value}\t880000003"
    fails(tmp_path, [HEADER, *rows], "line 4", f"item_id {shown}")


def test_empty_file_and_header_only(tmp_path):
    fails(tmp_path, [], "is empty", raw=b"")
    fails(tmp_path, [HEADER], "has a header but no data lines")


def test_not_utf8_names_the_line(tmp_path):
    rows = [row.encode() for row in valid_rows() * 8]  # ~15 KB: past the first chunk a decoder reads
    rows[700] = rows[700].replace(b"\t", b"\xff\t", 1)
    raw = b"\n".join([HEADER.encode(), *rows]) + b"\n"
    fails(tmp_path, [], "line 702", "not utf-8 text", raw=raw, encoding="utf-8")


def test_windows_line_endings_work(tmp_path):
    write(tmp_path, [], raw=("\r\n".join([HEADER, *valid_rows()]) + "\r\n").encode())
    assert load(tmp_path)[0] == {"users": 12, "items": 12, "interactions": 96}


def test_byte_order_mark(tmp_path):
    fails(tmp_path, [], "byte-order mark", raw=("\ufeff" + "\n".join([HEADER, *valid_rows()]) + "\n").encode())


def test_users_with_a_single_interaction(tmp_path):
    # Documented RecBole behaviour: the plugin's 5-core filter drops them; without filtering they give
    # no training or evaluation sample (a sequential sample needs a previous item), and the rest trains.
    lonely = [f"lonely{u}\t1\t{990_000_000 + u}" for u in range(3)]
    write(tmp_path, [HEADER, *valid_rows(), *lonely])
    assert load(tmp_path)[0]["users"] == 12
    counts, (train, valid, test), _ = load(tmp_path, **NO_FILTER)
    assert counts["users"] == 15
    assert len(test._dataset) == 12


def test_only_single_interactions_is_a_clear_error(tmp_path):
    rows = [f"{u}\t{u}\t{u}" for u in range(1, 30)]
    fails(tmp_path, [HEADER, *rows], "training split is empty", "at least 2 interactions", **NO_FILTER)


def test_filtering_that_leaves_nothing_is_a_clear_error(tmp_path):
    rows = [f"{u}\t{u % 7}\t{u}" for u in range(1, 30)]  # every user has one interaction
    fails(tmp_path, [HEADER, *rows], "No interactions", "user_inter_num_interval=[5,inf)")


def test_fewer_items_than_topk_is_a_clear_error(tmp_path):
    fails(tmp_path, [HEADER, *valid_rows(items=8)], "8 item(s)", "largest topk (10)")


def test_duplicate_rows_are_kept(tmp_path):
    rows = valid_rows()
    write(tmp_path, [HEADER, *rows, *rows[:5]])  # RecBole keeps duplicates unless rm_dup_inter is set
    assert load(tmp_path)[0]["interactions"] == 101
    assert load(tmp_path, rm_dup_inter="first")[0]["interactions"] == 96


def test_ids_with_spaces_unicode_and_a_huge_id_space(tmp_path):
    # Ids are tokens: any text, remapped to 1..n, so item ids up to 10^15 cost nothing.
    rows = []
    for row in valid_rows():
        user, item, time = row.split("\t")
        rows.append(f"user {user} – ü\t{int(item) * 10**14}\t{time}")
    write(tmp_path, [HEADER, *rows])
    counts, _, dataset = load(tmp_path)
    assert counts["items"] == 12 and counts["users"] == 12
    assert dataset.id2token("user_id", dataset.token2id("user_id", "user 3 – ü")) == "user 3 – ü"
    assert dataset.token2id("item_id", str(12 * 10**14)) > 0
    result = run("Mamba4Rec", "data", config_dict={**FAST_SETTINGS, **TINY_MAMBA, "data_path": str(tmp_path), "epochs": 1})
    assert set(result["test_result"]) == {"hit@10", "ndcg@10", "mrr@10"}


# Fuzz ------------------------------------------------------------------------------------------

PIECES = ["\t", " ", '"', "a", "7", "é", "\x00", "\r", "\n", "-", ".", "NA", "null", "1e999", "\t\t"]
CELLS = ["", "abc", "NA", "-1", "9" * 30, "ü ß", "1.5.2", "inf", '"', "None"]
HEADERS = [
    "user_id:token\titem_id:token",
    "user_id:token\titem_id:token\ttimestamp:str",
    "user_id\titem_id:token\ttimestamp:float",
    "user_id:token\titem_id:token\ttimestamp:float\textra:token",
    "item_id:token\tuser_id:token\ttimestamp:float",
]


def corrupt(text, rng):
    """1 to 3 random damages: characters deleted or inserted, lines duplicated, deleted or cut,
    cells replaced, the header changed, invalid UTF-8 bytes."""
    data = text.encode()
    for _ in range(rng.randint(1, 3)):
        lines = data.split(b"\n")
        operation = rng.randrange(9)
        if operation == 0 and data:
            position = rng.randrange(len(data))
            data = data[:position] + data[position + 1 :]
        elif operation == 1:
            position = rng.randrange(len(data) + 1)
            data = data[:position] + rng.choice(PIECES).encode() + data[position:]
        elif operation == 2:
            lines.insert(rng.randrange(1, len(lines) + 1), rng.choice(lines))
            data = b"\n".join(lines)
        elif operation == 3 and len(lines) > 2:
            del lines[rng.randrange(1, len(lines))]
            data = b"\n".join(lines)
        elif operation == 4:
            data = data[: rng.randrange(len(data) + 1)]
        elif operation == 5 and len(lines) > 2:
            k = rng.randrange(1, len(lines))
            cells = lines[k].split(b"\t")
            cells[rng.randrange(len(cells))] = rng.choice(CELLS).encode()
            lines[k] = b"\t".join(cells)
            data = b"\n".join(lines)
        elif operation == 6:
            lines[0] = rng.choice(HEADERS).encode()
            data = b"\n".join(lines)
        elif operation == 7:
            position = rng.randrange(len(data) + 1)
            data = data[:position] + b"\xff\xfe" + data[position:]
        else:
            keep = [lines[0], *rng.sample(lines[1:], k=max(0, len(lines) - 1 - rng.randint(1, 60)))]
            data = b"\n".join(keep)
    return data


class Hang(Exception):
    pass


def _raise_hang(signum, frame):
    raise Hang()


@pytest.fixture
def watchdog():
    """``watchdog(seconds)`` arms SIGALRM: a variant that takes longer raises Hang."""
    previous = signal.signal(signal.SIGALRM, _raise_hang)
    yield signal.alarm
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_fuzzed_files_load_or_fail_clearly(tmp_path, watchdog):
    rng = random.Random(20240601)
    valid = "\n".join([HEADER, *valid_rows()]) + "\n"
    path = write(tmp_path, [HEADER, *valid_rows()])
    config = create_config("Mamba4Rec", "data", config_dict={**FAST_SETTINGS, **TINY_MAMBA, "data_path": str(tmp_path)})
    from recbole_mamba.data.checks import check_dataset_files

    outcomes = {"loaded": 0, "clear error": 0}
    for variant in range(300):
        data = corrupt(valid, rng)
        path.write_bytes(data)
        watchdog(20)
        try:
            check_dataset_files(config)  # what create_config checks, on the same settings
            prepare_dataloaders(config, load_dataset(config))
            outcomes["loaded"] += 1
        except UserInputError as error:
            assert str(path) in str(error), (variant, data, error)
            outcomes["clear error"] += 1
        except Hang:
            pytest.fail(f"variant {variant} took more than 20 s: {data!r}")
        except Exception as error:  # anything else is a bug: show the file that caused it
            pytest.fail(f"variant {variant}: {type(error).__name__}: {error}\n{data!r}")
        finally:
            watchdog(0)
    assert outcomes["loaded"] > 30 and outcomes["clear error"] > 30, outcomes  # both kinds are exercised


def test_fuzzed_files_that_load_also_train(tmp_path):
    rng = random.Random(7)
    valid = "\n".join([HEADER, *valid_rows()]) + "\n"
    path = write(tmp_path, [HEADER, *valid_rows()])
    settings = {**FAST_SETTINGS, **TINY_MAMBA, "data_path": str(tmp_path), "epochs": 1}
    trained = 0
    while trained < 4:
        data = corrupt(valid, rng)
        path.write_bytes(data)
        try:
            load(tmp_path)
        except UserInputError:
            continue
        result = run("Mamba4Rec", "data", config_dict=settings)
        assert set(result["test_result"]) == {"hit@10", "ndcg@10", "mrr@10"}, data
        trained += 1
