"""Queries compiled once and run many times, for the two paths where people wait on every request: a friend
joining (players.services.redeem_invite) and a profile download (players.fastpath).

Django compiles a queryset to SQL every time it runs one. For the single-row lookups and inserts on those paths the
compiling costs several times the query: 0.1-0.3 ms each, against some 0.02 ms for SQLite to run it
(benchmarks/README.md, issue_player.py --profile). Here Django still writes the SQL, so it follows the models and
suits SQLite and PostgreSQL alike, but only once per database alias; later runs reuse it with new parameters.

- `PreparedSelect`: a ``values_list`` queryset built once with marker parameters; ``run(**params)`` returns its
  rows as tuples, converted as the ORM converts them (dates, booleans, JSON).
- `PreparedUpdate`: a queryset's ``update(**values)`` likewise; ``run(**params)`` returns the rows changed, or with
  ``returning=`` their values (``UPDATE ... RETURNING``).
- `insert(obj)`: ``obj.save()`` of a new row without the compiling; a model with save signal receivers is simply
  saved (LanHub has none, and this keeps it right if one is added).

All three go through Django's cursor, so transactions, ``assertNumQueries`` and the debug toolbar see them as any
other query. Parameters are passed to the driver as given: plain strings and integers.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import Model, QuerySet
from django.db.models.signals import post_save, pre_save
from django.db.models.sql import InsertQuery, UpdateQuery


class _Prepared:
    """Compile `build(**markers)` once per alias, find where each marker landed among the SQL's parameters, and
    put the real values there on every run. A marker that a lookup transformed (``iexact`` escapes and lowers its
    value) is not found, and compiling fails loudly rather than running the wrong query."""

    def __init__(self, build: Callable[..., QuerySet], **kinds: type):
        self._build, self._kinds = build, kinds
        self._compiled: dict[str, tuple] = {}

    def _markers(self) -> dict:
        # Strings no request can contain, and integers far outside any primary key in use. The string holds what
        # pattern lookups escape or wrap ("_", "%", "\\") and a capital, so such a lookup is caught, not compiled.
        return {name: f"\x00Prepared_%\\{name}:{secrets.token_hex(8)}\x00" if kind is str
                else -(2**62) - secrets.randbelow(2**40) for name, kind in self._kinds.items()}

    def _slots(self, params, markers: dict) -> tuple[tuple, dict[str, list[int]]]:
        slots = {}
        for name, marker in markers.items():
            slots[name] = [i for i, p in enumerate(params) if type(p) is type(marker) and p == marker]
            if not slots[name]:
                raise ImproperlyConfigured(f"prepared query: parameter {name!r} does not reach the SQL unchanged")
        return tuple(params), slots

    def _args(self, template: tuple, slots: dict[str, list[int]], params: dict) -> list:
        args = list(template)
        for name, positions in slots.items():
            for i in positions:
                args[i] = params[name]
        return args


class PreparedSelect(_Prepared):
    """``PreparedSelect(lambda token: Player.objects.filter(token=token).values_list("pk", "nickname")[:1],
    token=str).run(token=t)`` -> ``[(pk, nickname)]``."""

    def _compile(self, using: str) -> tuple:
        markers = self._markers()
        compiler = self._build(**markers).query.get_compiler(using)
        sql, params = compiler.as_sql()
        template, slots = self._slots(params, markers)
        converters = compiler.get_converters([s[0] for s in compiler.select[: compiler.col_count]])
        self._compiled[using] = compiled = (sql, template, slots, converters)
        return compiled

    def run(self, *, using: str = DEFAULT_DB_ALIAS, **params) -> list[tuple]:
        sql, template, slots, converters = self._compiled.get(using) or self._compile(using)
        connection = connections[using]
        with connection.cursor() as cursor:
            cursor.execute(sql, self._args(template, slots, params))
            rows = cursor.fetchall()
        return _converted(rows, converters, connection)


class PreparedUpdate(_Prepared):
    """``PreparedUpdate(lambda pk: Invite.objects.filter(pk=pk), {"uses": F("uses") + 1}, pk=int).run(pk=7)``.

    With `returning` (field names of the updated model, and ``fk__field`` for a field of the row a foreign key
    points to), ``run`` returns the updated rows' values as tuples instead of a count: ``UPDATE ... RETURNING``, with
    each ``fk__field`` a scalar subquery by primary key (SQLite 3.35+ and PostgreSQL run both). One statement then
    locks a row, changes it and reads it with what it points to."""

    def __init__(self, build: Callable[..., QuerySet], values: dict, *, returning: tuple[str, ...] = (),
                 **kinds: type):
        super().__init__(build, **kinds)
        self._values, self._returning = values, returning

    def _compile(self, using: str) -> tuple:
        markers = self._markers()
        query = self._build(**markers).query.chain(UpdateQuery)
        query.add_update_values(self._values)
        sql, params = query.get_compiler(using).as_sql()
        converters = {}
        if self._returning:
            if not connections[using].features.can_return_columns_from_insert:  # SQLite before 3.35
                raise ImproperlyConfigured("prepared update: the database cannot return rows from an UPDATE")
            columns, converters = _returning(query.model, self._returning, connections[using])
            sql = f"{sql} RETURNING {', '.join(columns)}"
        self._compiled[using] = compiled = (sql, *self._slots(params, markers), converters)
        return compiled

    def run(self, *, using: str = DEFAULT_DB_ALIAS, **params) -> int | list[tuple]:
        sql, template, slots, converters = self._compiled.get(using) or self._compile(using)
        connection = connections[using]
        with connection.cursor() as cursor:
            cursor.execute(sql, self._args(template, slots, params))
            if not self._returning:
                return cursor.rowcount
            rows = cursor.fetchall()
        return _converted(rows, converters, connection)


def _returning(model: type, names: tuple[str, ...], connection) -> tuple[list[str], dict]:
    """The RETURNING clause's columns for `names` and, by position, the converters the ORM would apply to each."""
    qn, table = connection.ops.quote_name, model._meta.db_table
    columns, converters = [], {}
    for position, name in enumerate(names):
        fk_name, _, related_name = name.rpartition("__")
        if fk_name:
            fk = model._meta.get_field(fk_name)
            target = fk.related_model._meta
            field = target.get_field(related_name)
            column = (f"(SELECT {qn(target.db_table)}.{qn(field.column)} FROM {qn(target.db_table)} "
                      f"WHERE {qn(target.db_table)}.{qn(fk.target_field.column)} = {qn(table)}.{qn(fk.column)})")
            col = field.get_col(target.db_table)
        else:
            field = model._meta.get_field(name)
            column, col = f"{qn(table)}.{qn(field.column)}", field.get_col(table)
        columns.append(column)
        functions = connection.ops.get_db_converters(col) + col.get_db_converters(connection)
        if functions:
            converters[position] = (functions, col)
    return columns, converters


def _converted(rows: list[tuple], converters: dict, connection) -> list[tuple]:
    """Rows with each value converted as the ORM converts it (compiler.apply_converters)."""
    if not converters:
        return rows
    converted = []
    for row in rows:
        row = list(row)
        for position, (functions, expression) in converters.items():
            value = row[position]
            for function in functions:
                value = function(value, expression, connection)
            row[position] = value
        converted.append(tuple(row))
    return converted


_INSERTS: dict[tuple[type, str], tuple] = {}


def insert(obj: Model, *, using: str = DEFAULT_DB_ALIAS) -> Model:
    """Insert a new row for `obj` (its primary key unset) and give it the key, as ``obj.save()`` would."""
    model = type(obj)
    if obj.pk is not None or pre_save.has_listeners(model) or post_save.has_listeners(model):
        obj.save(using=using, force_insert=True)
        return obj
    connection = connections[using]
    compiled = _INSERTS.get((model, using)) or _compile_insert(model, obj, using)
    sql, fields, returning, returning_params = compiled
    params = [field.get_db_prep_save(field.pre_save(obj, True), connection) for field in fields]
    meta = model._meta
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        if returning:
            pk = connection.ops.fetch_returned_insert_columns(cursor, returning_params)[0]
        else:
            pk = connection.ops.last_insert_id(cursor, meta.db_table, meta.pk.column)
    obj.pk = pk
    obj._state.adding, obj._state.db = False, using
    return obj


def _compile_insert(model: type, obj: Model, using: str) -> tuple:
    meta = model._meta
    if meta.auto_field is None or meta.parents:
        raise ImproperlyConfigured(f"prepared insert: {meta.label} needs an automatic primary key and no parents")
    fields = [f for f in meta.local_concrete_fields if f is not meta.auto_field and not f.generated]
    query = InsertQuery(model)
    query.insert_values(fields, [obj])
    compiler = query.get_compiler(using)
    returning = connections[using].features.can_return_columns_from_insert
    compiler.returning_fields = [meta.pk] if returning else None
    [(sql, _)] = compiler.as_sql()
    _INSERTS[(model, using)] = compiled = (sql, fields, returning, compiler.returning_params)
    return compiled
