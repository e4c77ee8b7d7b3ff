//! The entity-relationship diagram of `docs/design/erd.md` against the schema the
//! migrations create.
//!
//! Every table and column of a freshly migrated database must be an entity and an
//! attribute of the page's `erDiagram`, and every entity and attribute of the diagram a
//! table and a column of the database. A migration that adds, drops or renames a column
//! therefore changes the diagram in the same commit, or this test fails naming what differs
//! on each side.

use std::collections::{BTreeMap, BTreeSet};

use sea_orm::{ConnectionTrait, DbBackend, Statement};

use super::Db;

/// Table name to its column names.
type Schema = BTreeMap<String, BTreeSet<String>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_erd_names_every_table_and_column_of_the_migrated_schema() {
    let path = format!("{}/../../docs/design/erd.md", env!("CARGO_MANIFEST_DIR"));
    let page = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {path}: {error}"));
    let drawn = erd_schema(&page);

    let db = Db::fresh("erd").await;
    let stored = database_schema(&db).await;
    db.drop_now().await;

    assert!(!stored.is_empty(), "the migrated database has no table");
    assert!(!drawn.is_empty(), "the erDiagram of {path} has no entity");
    let missing_from_erd = difference(&stored, &drawn);
    let missing_from_database = difference(&drawn, &stored);
    assert!(
        missing_from_erd.is_empty() && missing_from_database.is_empty(),
        "docs/design/erd.md and the migrated schema differ.\n\
         In the database, missing from the ERD:\n{}\n\
         In the ERD, missing from the database:\n{}",
        listing(&missing_from_erd),
        listing(&missing_from_database),
    );
}

/// The tables and columns of the database `db` is connected to, as MySQL reports them,
/// without sea-orm's record of the applied migrations.
async fn database_schema(db: &Db) -> Schema {
    let rows = db
        .conn
        .query_all_raw(Statement::from_string(
            DbBackend::MySql,
            "SELECT CAST(table_name AS CHAR) AS t, CAST(column_name AS CHAR) AS c \
             FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name <> 'seaql_migrations'",
        ))
        .await
        .expect("read information_schema.columns");
    let mut schema = Schema::new();
    for row in rows {
        let table = row.try_get::<String>("", "t").expect("a table name");
        let column = row.try_get::<String>("", "c").expect("a column name");
        schema.entry(table).or_default().insert(column);
    }
    schema
}

/// The entities and attributes of the page's one `erDiagram` block: `name {` opens an
/// entity, `}` closes it, and each line between is an attribute, `TYPE name` followed by
/// optional keys (`PK`, `FK`, `UK`) and a quoted comment. Lines outside an entity
/// (relationships) name no table.
fn erd_schema(page: &str) -> Schema {
    let diagrams: Vec<Vec<&str>> = mermaid_blocks(page)
        .into_iter()
        .filter(|block| block.first().is_some_and(|first| first.starts_with("erDiagram")))
        .collect();
    assert_eq!(diagrams.len(), 1, "the page must hold exactly one ```mermaid block that is an erDiagram");
    let mut schema = Schema::new();
    let mut entity: Option<String> = None;
    for line in diagrams[0].iter().skip(1) {
        if let Some(name) = entity.clone() {
            if *line == "}" {
                entity = None;
                continue;
            }
            let mut words = line.split_whitespace();
            let attribute = match (words.next(), words.next()) {
                (Some(_type), Some(attribute)) => attribute,
                _ => panic!("entity {name}: {line:?} is not `TYPE name [keys] [\"comment\"]`"),
            };
            let columns = schema.entry(name.clone()).or_default();
            assert!(columns.insert(attribute.to_owned()), "entity {name} names {attribute} twice");
        } else if let Some(head) = line.strip_suffix('{') {
            let name = head.trim();
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line:?} does not open an entity as `table_name {{`"
            );
            assert!(!schema.contains_key(name), "entity {name} is drawn twice");
            schema.insert(name.to_owned(), BTreeSet::new());
            entity = Some(name.to_owned());
        }
    }
    assert!(entity.is_none(), "an entity block of the erDiagram is not closed");
    schema
}

/// The lines of every ```mermaid block of `page`, trimmed, without blank lines and `%%`
/// comments.
fn mermaid_blocks(page: &str) -> Vec<Vec<&str>> {
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    let mut inside = false;
    for line in page.lines().map(str::trim) {
        if !inside {
            if line == "```mermaid" {
                inside = true;
                blocks.push(Vec::new());
            }
        } else if line.starts_with("```") {
            inside = false;
        } else if !line.is_empty()
            && !line.starts_with("%%")
            && let Some(block) = blocks.last_mut()
        {
            block.push(line);
        }
    }
    blocks
}

/// What `ours` has and `theirs` lacks: a whole table as `table name (its columns)`, else
/// each column as `table.column`.
fn difference(ours: &Schema, theirs: &Schema) -> Vec<String> {
    let mut missing = Vec::new();
    for (table, columns) in ours {
        match theirs.get(table) {
            None => missing.push(format!(
                "table {table} ({})",
                columns.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
            )),
            Some(other) => {
                missing.extend(columns.difference(other).map(|column| format!("{table}.{column}")));
            }
        }
    }
    missing
}

fn listing(lines: &[String]) -> String {
    if lines.is_empty() {
        return "  (nothing)".to_owned();
    }
    lines.iter().map(|line| format!("  {line}")).collect::<Vec<_>>().join("\n")
}
