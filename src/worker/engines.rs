//! The models a worker has loaded, kept across the orders it carries: a carrier's next
//! group of the same models starts inferring at once instead of loading them again (0.1 s
//! to over a second per model), and a standby worker loads them before any order comes.

use std::sync::{Arc, Mutex};

use super::WorkerError;
use crate::inference::{Catalog, Engine, EngineOptions};
use crate::sync::lock;

/// The last engine a worker loaded, handed to the next order whose models it has.
pub struct Engines {
    options: EngineOptions,
    kept: Mutex<Option<Arc<Engine>>>,
}

impl Engines {
    pub fn new(options: EngineOptions) -> Self {
        Engines {
            options,
            kept: Mutex::new(None),
        }
    }

    /// Loads the models a standby keeps ready: every analyser and every model of the
    /// catalog that runs on the CPU and is present (a standby's pod has the shape of the
    /// namespace's CPU Jobs). Returns their names.
    pub async fn preload_cpu_models(&self, catalog: Catalog) -> Result<Vec<String>, WorkerError> {
        let mut names: Vec<String> = catalog
            .models()
            .iter()
            .filter(|m| !m.gpu && (m.fetch.is_none() || m.model_path.is_file()))
            .map(|m| m.name.clone())
            .collect();
        names.extend(catalog.analysers().iter().map(|a| a.name.clone()));
        if !names.is_empty() {
            self.for_models(catalog, &names).await?;
        }
        Ok(names)
    }

    /// An engine with every one of `models`: the kept one when it has them all, else a new
    /// one with just those, which is kept in its place (one set of sessions in memory).
    /// Returns whether it was loaded now.
    pub async fn for_models(
        &self,
        catalog: Catalog,
        models: &[String],
    ) -> Result<(Arc<Engine>, bool), WorkerError> {
        if let Some(kept) = lock(&self.kept).as_ref()
            && models.iter().all(|m| kept.has(m))
        {
            return Ok((kept.clone(), false));
        }
        // Dropped before the new one loads: two sets of sessions at once could pass the
        // pod's memory limit.
        lock(&self.kept).take();
        let options = self.options.clone();
        let wanted = models.to_vec();
        let engine = tokio::task::spawn_blocking(move || Engine::load(&catalog, &wanted, &options))
            .await??;
        let engine = Arc::new(engine);
        *lock(&self.kept) = Some(engine.clone());
        Ok((engine, true))
    }
}
