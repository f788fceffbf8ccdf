//! Loading a configuration: the layers (defaults, file, environment overrides) merged into one
//! tree, deserialised section by section so that every unknown key and every bad value is
//! reported at once, then [`Config::validate`]d. The errors name the key.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;

use super::*;

/// One problem in the configuration, naming the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the key (`tokens.flinks.token_url`, `routes[0].host`).
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    pub(super) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Every problem found, reported together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration ({} problem{}):",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  - {}: {}", e.key, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Loads the configuration from `path` (TOML or YAML by extension) and the process environment,
/// then validates it.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with_env(path, None)
}

/// Like [`load`], with the environment given explicitly (`None`: the process environment).
pub fn load_with_env(
    path: &Path,
    env: Option<HashMap<String, String>>,
) -> Result<Config, ConfigErrors> {
    let (text, format) = read(path)?;
    from_str(&text, format, env)
}

/// The text of the file at `path` and its format (by extension), for [`from_str`]. A reload
/// reads the text itself so that the hash it reports is of exactly what it parsed.
pub fn read(path: &Path) -> Result<(String, config::FileFormat), ConfigErrors> {
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => config::FileFormat::Toml,
        Some("yaml" | "yml") => config::FileFormat::Yaml,
        _ => {
            return Err(ConfigErrors(vec![ConfigError::new(
                "(file)",
                format!(
                    "{}: unknown format; name the file *.toml, *.yaml or *.yml",
                    path.display()
                ),
            )]));
        }
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            "(file)",
            format!("cannot read {}: {e}", path.display()),
        )])
    })?;
    Ok((text, format))
}

/// Parses a configuration document (plus environment overrides) and validates it.
pub fn from_str(
    text: &str,
    format: config::FileFormat,
    env: Option<HashMap<String, String>>,
) -> Result<Config, ConfigErrors> {
    let built = config::Config::builder()
        .add_source(config::File::from_str(text, format))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .separator(ENV_SEPARATOR)
                .source(env),
        )
        .build()
        .map_err(|e| ConfigErrors(vec![ConfigError::new("(file)", e.to_string())]))?;
    let root: HashMap<String, config::Value> = built
        .try_deserialize()
        .map_err(|e| ConfigErrors(vec![ConfigError::new("(file)", e.to_string())]))?;
    from_tree(root)
}

/// Builds a [`Config`] from the parsed tree, section by section, so that a mistake in one
/// section does not hide the mistakes in the others.
fn from_tree(mut root: HashMap<String, config::Value>) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let proxy = section::<ProxyConfig>(root.remove("proxy"), "proxy", &mut errors);
    let admin = section::<AdminConfig>(root.remove("admin"), "admin", &mut errors);
    let log = section::<LogConfig>(root.remove("log"), "log", &mut errors);
    let reload = section::<ReloadConfig>(root.remove("reload"), "reload", &mut errors);

    let mut tokens = BTreeMap::new();
    if let Some(value) = root.remove("tokens") {
        match value.into_table() {
            Ok(table) => {
                for (name, value) in table {
                    let key = format!("tokens.{name}");
                    if let Some(mut t) = parse::<TokenConfig>(value, &key, &mut errors) {
                        t.name = name.clone();
                        tokens.insert(name, t);
                    }
                }
            }
            Err(e) => errors.push(ConfigError::new("tokens", e.to_string())),
        }
    }
    let mut routes = Vec::new();
    if let Some(value) = root.remove("routes") {
        match value.into_array() {
            Ok(list) => {
                for (i, value) in list.into_iter().enumerate() {
                    if let Some(r) =
                        parse::<RouteConfig>(value, &format!("routes[{i}]"), &mut errors)
                    {
                        routes.push(r);
                    }
                }
            }
            Err(e) => errors.push(ConfigError::new("routes", e.to_string())),
        }
    }
    let subjects = root
        .remove("subjects")
        .and_then(|v| parse::<SubjectsConfig>(v, "subjects", &mut errors));
    let redis = root
        .remove("redis")
        .and_then(|v| parse::<RedisConfig>(v, "redis", &mut errors));
    let mut unknown: Vec<_> = root.into_keys().collect();
    unknown.sort();
    for key in unknown {
        errors.push(ConfigError::new(key, "unknown section"));
    }

    let config = Config {
        proxy: proxy.unwrap_or_default(),
        admin: admin.unwrap_or_default(),
        log: log.unwrap_or_default(),
        tokens,
        routes,
        subjects,
        redis,
        reload: reload.unwrap_or_default(),
    };
    errors.extend(config.problems());
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn section<T: DeserializeOwned + Default>(
    value: Option<config::Value>,
    key: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    match value {
        None => Some(T::default()),
        Some(v) => parse(v, key, errors),
    }
}

/// Deserializes one section, recording its unknown keys and its first type error. Unknown keys
/// are found from the struct's field list rather than during deserialization, so a type error
/// earlier in the table does not hide a misspelt key later in it.
fn parse<T: DeserializeOwned>(
    value: config::Value,
    key: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    if let Ok(table) = value.clone().into_table() {
        let known = field_names::<T>();
        let mut unknown: Vec<_> = table
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .collect();
        unknown.sort();
        for k in unknown {
            errors.push(ConfigError::new(format!("{key}.{k}"), "unknown key"));
        }
    }
    let mut track = serde_path_to_error::Track::new();
    match T::deserialize(serde_path_to_error::Deserializer::new(value, &mut track)) {
        Ok(v) => Some(v),
        Err(e) => {
            let path = track.path().to_string();
            let full = if path == "." || path.is_empty() {
                key.to_owned()
            } else {
                format!("{key}.{path}")
            };
            errors.push(ConfigError::new(full, e.to_string()));
            None
        }
    }
}

/// The field names a derived `Deserialize` struct accepts, learnt by offering it a deserializer
/// that records what `deserialize_struct` is asked for.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor, value::Error};

    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(Error::custom("probe"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Error> {
            *self.0 = fields;
            Err(Error::custom("probe"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}
