"""runtime/partitioner.py: the one partitioner puts a key where Kafka's default partitioner (murmur2) does."""

from aiokafka.partitioner import DefaultPartitioner
from flywheel.runtime.partitioner import partition_for, partition_of
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=1, max_size=64) | st.none(), n=st.integers(1, 64))
def test_records_go_to_the_partition_kafkas_default_partitioner_picks(key, n):

    partitions = list(range(n))
    if key is None:
        assert partition_for(None, partitions) in partitions
    else:
        assert partition_for(key, partitions) == DefaultPartitioner()(key, partitions, partitions)


@given(key=st.binary(min_size=1, max_size=64), n=st.integers(1, 64))
def test_partition_of_a_count_is_partition_for_the_range(key, n):
    assert partition_of(key, n) == partition_for(key, list(range(n)))
