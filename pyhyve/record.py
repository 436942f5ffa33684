"""`record`: typing.NamedTuple's class syntax, without importing typing.

Importing typing costs about 5 ms (Debian's python3.11), a tenth of the
pyhyve command's start-up, and pyhyve needed it only to declare named tuples
and interfaces.  A class decorated with `@record` becomes a
collections.namedtuple: its annotated names are the fields, in order, the
values given to them their defaults, and its other attributes (docstring,
methods, properties) stay.
"""

from collections import namedtuple


def record(cls: type) -> type:
    body = dict(cls.__dict__)
    fields = list(body.get("__annotations__", {}))
    defaults = []
    for name in fields:
        if name in body:
            defaults.append(body.pop(name))
        elif defaults:
            raise TypeError(f"{cls.__name__}.{name}: a field without a default "
                            "follows one with a default")
    body.pop("__dict__", None)
    body.pop("__weakref__", None)
    body["__slots__"] = ()
    base = namedtuple(cls.__name__, fields, defaults=defaults, module=cls.__module__)
    return type(cls.__name__, (base,), body)
