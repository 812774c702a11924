"""chromalab.data.records: TFRecord framing and tf.train.Example without TensorFlow, checked against TensorFlow."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from chromalab.errors import ChromalabError
from chromalab.data.records import RecordIndex, RecordWriter, decode_example, encode_example, read_records

PAYLOAD = np.arange(-3, 200, dtype=np.float16).tobytes()


def _tf_example(i: int) -> bytes:
    feature = tf.train.Feature
    return tf.train.Example(features=tf.train.Features(feature={
        "photo_id": feature(bytes_list=tf.train.BytesList(value=[f"p{i}".encode(), b"second"])),
        "size": feature(int64_list=tf.train.Int64List(value=[i, -7, 2**40])),
        "scores": feature(float_list=tf.train.FloatList(value=[0.5 * i, -1.25])),
        "lab": feature(bytes_list=tf.train.BytesList(value=[PAYLOAD])),
    })).SerializeToString()


def test_chromalab_reads_what_tensorflow_writes(tmp_path):
    path = tmp_path / "tf.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(5):
            writer.write(_tf_example(i))
    records = list(read_records(path))
    assert len(records) == 5
    for i, data in enumerate(records):
        example = decode_example(data)
        assert example["photo_id"] == [f"p{i}".encode(), b"second"]
        assert example["size"].tolist() == [i, -7, 2**40]
        assert example["scores"].tolist() == [0.5 * i, -1.25]
        assert example["lab"] == [PAYLOAD]
    index = RecordIndex([path, path])
    assert len(index) == 10 and decode_example(index.read(7))["size"][0] == 2  # 2nd file's 3rd record
    index.close()


def test_tensorflow_reads_what_chromalab_writes(tmp_path):
    path = tmp_path / "ours.tfrecord"
    with RecordWriter(path) as writer:
        for i in range(4):
            writer.write(encode_example({"photo_id": f"p{i}".encode(), "size": [i, -7, 2**40],
                                         "scores": np.array([0.5 * i, -1.25]), "lab": PAYLOAD}))
    spec = {"photo_id": tf.io.FixedLenFeature([], tf.string), "size": tf.io.FixedLenFeature([3], tf.int64),
            "scores": tf.io.FixedLenFeature([2], tf.float32), "lab": tf.io.FixedLenFeature([], tf.string)}
    parsed = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(str(path))]
    assert len(parsed) == 4
    for i, example in enumerate(parsed):
        assert example["photo_id"].numpy() == f"p{i}".encode()
        assert example["size"].numpy().tolist() == [i, -7, 2**40]
        assert example["scores"].numpy().tolist() == [0.5 * i, -1.25]
        assert example["lab"].numpy() == PAYLOAD
    # And byte for byte: the same Example from both writers frames identically.
    tf_path = tmp_path / "tf.tfrecord"
    with tf.io.TFRecordWriter(str(tf_path)) as writer:
        writer.write(_tf_example(3))
    with RecordWriter(tmp_path / "again.tfrecord") as writer:
        writer.write(_tf_example(3))
    assert (tmp_path / "again.tfrecord").read_bytes() == tf_path.read_bytes()


def _three_records(path):
    with RecordWriter(path) as writer:
        for i in range(3):
            writer.write(encode_example({"n": [i], "lab": PAYLOAD}))
    return path.read_bytes()


@pytest.mark.parametrize("where, what", [(-10, "data fails its checksum"), (3, "length fails its checksum")])
def test_a_flipped_bit_names_the_file_and_record(tmp_path, where, what):
    path = tmp_path / "bad.tfrecord"
    raw = bytearray(_three_records(path))
    record_size = len(raw) // 3
    raw[2 * record_size + (where % record_size)] ^= 0x10  # inside the 3rd record
    path.write_bytes(bytes(raw))
    with pytest.raises(ChromalabError) as err:
        list(read_records(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "record 3 " in message and what in message


@pytest.mark.parametrize("keep", [5, 40, -2])  # inside the 2nd record's header, its data, its data's checksum
def test_a_truncated_file_names_the_file_and_record(tmp_path, keep):
    path = tmp_path / "cut.tfrecord"
    raw = _three_records(path)
    record = len(raw) // 3
    path.write_bytes(raw[: record + keep % record])
    with pytest.raises(ChromalabError, match=r"cut\.tfrecord: record 2 is truncated"):
        list(read_records(path))
    with pytest.raises(ChromalabError, match=r"record 2 is truncated"):
        RecordIndex([path])


def test_an_index_over_several_files_reads_each_files_own_records(tmp_path):
    """The shards of a split hold records of one size at the same offsets: each must be read from its own file."""
    paths = [tmp_path / f"shard-{k}.tfrecord" for k in range(3)]
    for k, path in enumerate(paths):
        with RecordWriter(path) as writer:
            for i in range(2):
                writer.write(encode_example({"n": [10 * k + i], "lab": PAYLOAD}))
    index = RecordIndex(paths)
    try:
        assert [int(decode_example(index.read(i))["n"][0]) for i in (5, 0, 3, 2, 1, 4)] == [21, 0, 11, 10, 1, 20]
        assert index.location(3) == (paths[1], 2)
    finally:
        index.close()
