"""MODELPRESS_BROKER_PREFIX keeps deployments that share one Redis apart: the API's messages land
under the prefix, and a consumer without it never sees them."""

import uuid

import pytest
import redis
from pydantic import ValidationError

from service.config import Settings
from service.dispatch import CeleryDispatcher


def test_tasks_are_sent_under_the_prefix_only(redis_url, tmp_path):
    prefix = f"p{uuid.uuid4().hex[:8]}:"
    settings = Settings(data_dir=tmp_path, broker_url=redis_url, broker_key_prefix=prefix, auth="off")
    queue = f"q{uuid.uuid4().hex[:8]}"
    CeleryDispatcher(settings.broker_url, settings.broker_transport_options).enqueue("job_x", queue=queue)

    client = redis.Redis.from_url(redis_url)
    assert client.llen(prefix + queue) == 1  # the message waits under the prefixed queue...
    assert client.llen(queue) == 0  # ...and an unprefixed worker's queue stays empty
    CeleryDispatcher(settings.broker_url, {}).enqueue("job_y", queue=queue)
    assert client.llen(queue) == 1 and client.llen(prefix + queue) == 1


@pytest.mark.parametrize("prefix", ["a b", "x" * 65, "pre\nfix"])
def test_a_prefix_that_could_clash_or_confuse_is_refused(prefix, tmp_path):
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, broker_key_prefix=prefix)
