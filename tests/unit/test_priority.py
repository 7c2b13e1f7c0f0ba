import pytest

from llmos.errors import ValidationError
from llmos.priority import broker_priority, parse_priority


@pytest.mark.parametrize("value,expected", [(None, 5), (0, 0), (9, 9), ("7", 7), ("critical", 9),
                                            ("HIGH", 7), ("normal", 5), ("low", 3), ("batch", 1)])
def test_parse_priority(value, expected):
    assert parse_priority(value) == expected


@pytest.mark.parametrize("value", [-1, 10, "urgent", 3.5, True, "", [5], "²", "٣", "10", "9" * 5000, object()])
def test_bad_priorities_are_rejected(value):
    with pytest.raises(ValidationError, match="priority"):
        parse_priority(value)


def test_broker_priority_inverts_scale():
    # Celery's Redis transport serves 0 first: user 9 (most urgent) must become 0.
    assert [broker_priority(p) for p in range(10)] == list(range(9, -1, -1))
    assert broker_priority("critical") == 0 and broker_priority("batch") == 8
