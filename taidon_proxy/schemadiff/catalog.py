"""What a database's schema is made of, read from its catalogs into plain comparable data.

Each kind maps an object's qualified name to a description that is equal exactly when the
objects are (definitions as Postgres itself prints them: pg_get_constraintdef, indexdef,
viewdef, functiondef). System schemas are left out.
"""

from __future__ import annotations

from typing import Any

import asyncpg

USER_SCHEMAS = (
    "n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast')"
    " and n.nspname not like 'pg_temp_%' and n.nspname not like 'pg_toast_temp_%'"
)
QUERIES: dict[str, str] = {
    "extensions": "select extname, extversion from pg_extension",
    "schemas": f"""
        select n.nspname, pg_get_userbyid(n.nspowner) from pg_namespace n where {USER_SCHEMAS}""",
    "columns": f"""
        select n.nspname || '.' || c.relname || '.' || a.attname,
               format_type(a.atttypid, a.atttypmod)
               || case when a.attnotnull then ' not null' else '' end
               || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
               || case when a.attidentity <> '' then ' identity' else '' end
        from pg_attribute a
        join pg_class c on c.oid = a.attrelid
        join pg_namespace n on n.oid = c.relnamespace
        left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
        where c.relkind in ('r', 'p') and a.attnum > 0 and not a.attisdropped and {USER_SCHEMAS}""",
    "tables": f"""
        select n.nspname || '.' || c.relname,
               case c.relkind when 'p' then 'partitioned table' else 'table' end
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind in ('r', 'p') and {USER_SCHEMAS}""",
    "constraints": f"""
        select n.nspname || '.' || c.relname || '.' || k.conname, pg_get_constraintdef(k.oid)
        from pg_constraint k
        join pg_class c on c.oid = k.conrelid
        join pg_namespace n on n.oid = c.relnamespace
        where {USER_SCHEMAS}""",
    "indexes": f"""
        select n.nspname || '.' || i.relname, pg_get_indexdef(i.oid)
        from pg_index x
        join pg_class i on i.oid = x.indexrelid
        join pg_namespace n on n.oid = i.relnamespace
        where {USER_SCHEMAS}""",
    "views": f"""
        select n.nspname || '.' || c.relname,
               case c.relkind when 'm' then 'materialized: ' else '' end
               || pg_get_viewdef(c.oid, true)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind in ('v', 'm') and {USER_SCHEMAS}""",
    "sequences": """
        select schemaname || '.' || sequencename,
               format('%s start %s increment %s min %s max %s%s', data_type, start_value,
                      increment_by, min_value, max_value, case when cycle then ' cycle' else '' end)
        from pg_sequences""",
    "functions": f"""
        select n.nspname || '.' || p.proname
               || '(' || pg_get_function_identity_arguments(p.oid) || ')',
               case when p.prokind = 'a' then 'aggregate' else pg_get_functiondef(p.oid) end
        from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        left join pg_depend d on d.objid = p.oid and d.deptype = 'e'
        where d.objid is null and {USER_SCHEMAS}""",
    "types": f"""
        select n.nspname || '.' || t.typname,
               case t.typtype
                 when 'e' then 'enum (' || (select string_agg(quote_literal(e.enumlabel), ', '
                                             order by e.enumsortorder)
                                            from pg_enum e where e.enumtypid = t.oid) || ')'
                 when 'd' then 'domain ' || format_type(t.typbasetype, t.typtypmod)
                 else 'composite' end
        from pg_type t join pg_namespace n on n.oid = t.typnamespace
        left join pg_class c on c.oid = t.typrelid
        where t.typtype in ('e', 'd', 'c') and (t.typtype <> 'c' or c.relkind = 'c')
          and {USER_SCHEMAS}""",
    "grants": f"""
        select n.nspname || '.' || c.relname || ' to ' ||
               case when a.grantee = 0 then 'public' else pg_get_userbyid(a.grantee) end,
               string_agg(a.privilege_type, ', ' order by a.privilege_type)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace,
             aclexplode(c.relacl) a
        where c.relacl is not null and a.grantee <> c.relowner and {USER_SCHEMAS}
        group by 1""",
}
Schema = dict[str, dict[str, str]]


async def capture(conn: asyncpg.Connection, *, rows: bool = False) -> Schema:
    """Every kind's objects by qualified name; with rows, each table's row count too."""
    out: Schema = {}
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        for kind, sql in QUERIES.items():
            out[kind] = {str(r[0]): str(r[1]) for r in await conn.fetch(sql)}
        if rows:
            out["rows"] = {t: str(await _count(conn, t)) for t in sorted(out["tables"])}
    return out


async def _count(conn: asyncpg.Connection, table: str) -> Any:
    schema, _, name = table.partition(".")
    ident = f"{_quote(schema)}.{_quote(name)}"
    return await conn.fetchval(f"select count(*) from {ident}")  # names quoted above


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
