def cache_write(p):
    raise NotImplementedError
