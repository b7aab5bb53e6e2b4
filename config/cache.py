"""Django's Redis cache, reusing one redis-py client per connection pool.

Django builds a new `redis.Redis` for every cache call; its constructor fills a table of
~170 response callbacks, which was a fifth of an entitlement check's CPU. A client is
thread-safe (each command borrows a connection from the pool), so one per pool serves
every thread of the process, as redis-py intends.
"""

from django.core.cache.backends import redis as django_redis


class _ReusingClient(django_redis.RedisCacheClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clients = {}

    def get_client(self, key=None, *, write=False):
        index = self._get_connection_pool_index(write)
        client = self._clients.get(index)
        if client is None:
            client = self._clients[index] = self._client(connection_pool=self._get_connection_pool(write))
        return client


class RedisCache(django_redis.RedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = _ReusingClient
