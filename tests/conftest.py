"""Fixtures shared by the whole suite."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import IRIS


@pytest.fixture(scope="session")
def iris() -> pa.Table:
    return pq.read_table(IRIS)
