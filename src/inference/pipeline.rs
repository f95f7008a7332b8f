//! Image bytes in, results out: decoding and preprocessing overlap inference, each model
//! runs on its own thread (different models run at the same time; a single-image model
//! with several sessions on as many threads, images side by side), and a model whose
//! batch dimension is dynamic gets every image that is ready in one run.
//!
//! ```text
//!  submit(key, bytes) ─▶ decoder threads: decode, prepare per model ─▶ model queue ─▶ model thread (batches)
//!                                                                   ─▶ model queue ─▶ model thread
//!  next() ◀──────────────── the image's result once every model is done ◀──────────────────┘
//! ```
//!
//! This is the worker's image path (`kinsight worker`) and what the benchmark measures.
//! Results come out in completion order, tagged with the caller's key. Queues are bounded,
//! so a slow model slows the decoders down instead of filling memory with decoded images.
//! The threads stop once the [`Submitter`] is dropped and all work is out, or when the
//! [`Results`] are dropped.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use image::DynamicImage;
use tokio::sync::mpsc;

use super::decode::{DecodeLimits, decode_image};
use super::engine::{Engine, PreparedInput};
use super::output::ModelOutput;
use super::similarity::perceptual_hash;
use super::{InferenceError, cpu_limit, ms};

/// How the pipeline is laid out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelineOptions {
    pub decode_limits: DecodeLimits,
    /// Threads that decode and preprocess images; 0: half of [`cpu_limit`], at least 1.
    pub decoders: usize,
    /// Images prepared ahead per model (bounds memory: about 2 MB per 416x416 input);
    /// 0: twice the model's largest batch, at least 2.
    pub queue: usize,
}

/// One model's result on one image.
#[derive(Debug)]
pub struct ModelRun {
    pub result: Result<ModelOutput, InferenceError>,
    /// Milliseconds of the run that produced it; a batch's time is shared equally among
    /// its images.
    pub inference_ms: f64,
}

/// Every model's result on one decoded image.
#[derive(Debug, Default)]
pub struct ImageAnalysis {
    /// Of the decoded image (after EXIF orientation).
    pub width: u32,
    pub height: u32,
    /// Decoding the bytes, in milliseconds.
    pub decode_ms: f64,
    /// Preprocessing the image for every model, in milliseconds.
    pub preprocess_ms: f64,
    /// Perceptual hash of the decoded image ([`super::similarity`]); `None` if it failed.
    pub perceptual_hash: Option<String>,
    /// Per model name.
    pub models: BTreeMap<String, ModelRun>,
}

/// An image's result: its analysis, or why it could not be decoded.
pub type Outcome<K> = (K, Result<ImageAnalysis, InferenceError>);

/// The pipeline, started by [`Pipeline::start`] and used through its two halves.
pub struct Pipeline;

/// Feeds images in. Dropping it tells the pipeline no more images will come.
pub struct Submitter<K> {
    input: mpsc::Sender<Submission<K>>,
}

struct Submission<K> {
    key: K,
    bytes: Vec<u8>,
    /// `None`: every model of the pipeline.
    models: Option<Vec<String>>,
    /// The submitter's span: the image's `inference` span is its child.
    span: tracing::Span,
}

/// Reads results out, in completion order.
pub struct Results<K> {
    output: mpsc::UnboundedReceiver<Outcome<K>>,
    threads: Vec<JoinHandle<()>>,
    /// Threads found panicked when joined.
    panicked: usize,
}

/// The pipeline is gone (its threads ended): no more images are taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the inference pipeline has stopped")]
pub struct Stopped;

impl Pipeline {
    /// Starts the threads that run `models` (loaded in `engine`) on the submitted images.
    pub fn start<K: Send + 'static>(
        engine: Arc<Engine>,
        models: &[String],
        options: &PipelineOptions,
    ) -> Result<(Submitter<K>, Results<K>), InferenceError> {
        // Built-in analysers run on the decoder threads, on the image they just decoded.
        let (analysers, models): (Vec<String>, Vec<String>) = models
            .iter()
            .cloned()
            .partition(|model| engine.analyser(model).is_some());
        let analysers = Arc::new(analysers);
        let mut batches = Vec::with_capacity(models.len());
        for model in &models {
            let batch = engine
                .max_batch(model)
                .ok_or_else(|| InferenceError::UnknownModel(model.clone()))?;
            batches.push(batch.max(1));
        }
        let decoders = match options.decoders {
            0 => (cpu_limit() / 2).max(1),
            n => n,
        };
        let (input_tx, input_rx) = mpsc::channel::<Submission<K>>(decoders * 2);
        let (output_tx, output_rx) = mpsc::unbounded_channel::<Outcome<K>>();
        let input_rx = Arc::new(Mutex::new(input_rx));

        let mut threads = Vec::new();
        let mut queues = Vec::new();
        for (model, batch) in models.iter().zip(batches) {
            let depth = match options.queue {
                0 => (batch * 2).max(2),
                n => n,
            };
            let (tx, rx) = sync_channel::<Job<K>>(depth);
            queues.push((model.clone(), tx));
            // One thread per session of the model, taking images from the same queue.
            let rx = Arc::new(Mutex::new(rx));
            let instances = engine.instances(model).unwrap_or(1);
            for i in 0..instances {
                let engine = engine.clone();
                let model = model.clone();
                let rx = rx.clone();
                let name = match instances {
                    1 => format!("infer-{model}"),
                    _ => format!("infer-{model}-{i}"),
                };
                threads.push(spawn(name, move || {
                    model_loop(&engine, &model, batch, &rx);
                })?);
            }
        }
        let queues = Arc::new(queues);
        for i in 0..decoders {
            let engine = engine.clone();
            let input = input_rx.clone();
            let queues = queues.clone();
            let output = output_tx.clone();
            let limits = options.decode_limits;
            let analysers = analysers.clone();
            threads.push(spawn(format!("decode-{i}"), move || {
                decode_loop(&engine, &input, &analysers, &queues, &output, &limits);
            })?);
        }
        Ok((
            Submitter { input: input_tx },
            Results {
                output: output_rx,
                threads,
                panicked: 0,
            },
        ))
    }
}

fn spawn(
    name: String,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, InferenceError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(body)
        .map_err(|e| InferenceError::Internal(format!("cannot start a pipeline thread: {e}")))
}

impl<K: Send + 'static> Submitter<K> {
    /// Submits an image for every model of the pipeline, waiting while the pipeline is full.
    pub async fn submit(&self, key: K, bytes: Vec<u8>) -> Result<(), Stopped> {
        let submission = Submission {
            key,
            bytes,
            models: None,
            span: tracing::Span::current(),
        };
        self.input.send(submission).await.map_err(|_| Stopped)
    }

    /// Submits an image for some of the pipeline's models only (a model the pipeline
    /// does not run gets an [`InferenceError::UnknownModel`] result).
    pub async fn submit_for(
        &self,
        key: K,
        bytes: Vec<u8>,
        models: Vec<String>,
    ) -> Result<(), Stopped> {
        let submission = Submission {
            key,
            bytes,
            models: Some(models),
            span: tracing::Span::current(),
        };
        self.input.send(submission).await.map_err(|_| Stopped)
    }

    /// [`Submitter::submit`] for threads outside an async runtime.
    pub fn blocking_submit(&self, key: K, bytes: Vec<u8>) -> Result<(), Stopped> {
        let submission = Submission {
            key,
            bytes,
            models: None,
            span: tracing::Span::current(),
        };
        self.input.blocking_send(submission).map_err(|_| Stopped)
    }
}

impl<K: Send + 'static> Results<K> {
    /// The next finished image; `None` once the submitter is dropped and every image is out.
    pub async fn next(&mut self) -> Option<Outcome<K>> {
        let next = self.output.recv().await;
        if next.is_none() {
            self.join();
        }
        next
    }

    /// [`Results::next`] for threads outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Outcome<K>> {
        let next = self.output.blocking_recv();
        if next.is_none() {
            self.join();
        }
        next
    }

    /// How many of the pipeline's threads panicked, known once [`Results::next`] returned
    /// `None`. A panicked thread loses the images it held: they get no outcome.
    pub fn panicked(&self) -> usize {
        self.panicked
    }

    /// The channel is closed only when every thread dropped its sender: they are ending.
    fn join(&mut self) {
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("an inference pipeline thread panicked");
                self.panicked += 1;
            }
        }
    }
}

/// An image on its way through the models: the last model to finish sends it out.
struct InFlight<K> {
    state: Mutex<InFlightState<K>>,
    output: mpsc::UnboundedSender<Outcome<K>>,
    /// The image's `inference` span: it ends when the last of its models is done.
    span: tracing::Span,
}

struct InFlightState<K> {
    key: Option<K>,
    analysis: ImageAnalysis,
    remaining: usize,
}

impl<K> InFlight<K> {
    fn complete(&self, model: &str, run: ModelRun) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.analysis.models.insert(model.to_string(), run);
        state.remaining = state.remaining.saturating_sub(1);
        if state.remaining == 0
            && let Some(key) = state.key.take()
        {
            let analysis = std::mem::take(&mut state.analysis);
            // The receiver may be gone (the caller stopped listening): nothing to do then.
            let _ = self.output.send((key, Ok(analysis)));
        }
    }
}

struct Job<K> {
    image: Arc<InFlight<K>>,
    input: PreparedInput,
}

fn decode_loop<K>(
    engine: &Engine,
    input: &Mutex<mpsc::Receiver<Submission<K>>>,
    analysers: &[String],
    queues: &[(String, SyncSender<Job<K>>)],
    output: &mpsc::UnboundedSender<Outcome<K>>,
    limits: &DecodeLimits,
) {
    loop {
        if output.is_closed() {
            // Nobody reads the results any more.
            return;
        }
        // Held only while waiting for the next image; the other decoders wait their turn.
        let next = input
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .blocking_recv();
        let Some(Submission {
            key,
            bytes,
            models,
            span,
        }) = next
        else {
            return;
        };
        let inference = tracing::info_span!(parent: &span, "inference");
        let decoding = tracing::info_span!(parent: &inference, "decode").entered();
        let started = Instant::now();
        let image = match decode_image(&bytes, limits) {
            Ok(image) => image,
            Err(e) => {
                if output.send((key, Err(e))).is_err() {
                    return;
                }
                continue;
            }
        };
        drop(bytes);
        let decoded = Instant::now();
        // Every model's preprocessing works on RGB: convert once here, not once per model.
        let image = match image {
            DynamicImage::ImageRgb8(_) => image,
            other => DynamicImage::ImageRgb8(other.into_rgb8()),
        };
        let mut analysis = ImageAnalysis {
            width: image.width(),
            height: image.height(),
            decode_ms: ms(decoded - started),
            preprocess_ms: 0.0,
            perceptual_hash: None,
            models: BTreeMap::new(),
        };
        let mut prepared = Vec::with_capacity(queues.len());
        if let Some(wanted) = &models {
            for model in wanted {
                if !queues.iter().any(|(name, _)| name == model) && !analysers.contains(model) {
                    let run = ModelRun {
                        result: Err(InferenceError::UnknownModel(model.clone())),
                        inference_ms: 0.0,
                    };
                    analysis.models.insert(model.clone(), run);
                }
            }
        }
        let requested = |model: &String| models.as_ref().is_none_or(|m| m.contains(model));
        if let DynamicImage::ImageRgb8(rgb) = &image {
            // Every image gets one: near-duplicates are found across the group's results.
            analysis.perceptual_hash = perceptual_hash(rgb)
                .inspect_err(|e| tracing::warn!(error = %e, "no perceptual hash"))
                .ok();
            for analyser in analysers.iter().filter(|a| requested(a)) {
                let started = Instant::now();
                let result = engine.run_analyser(analyser, rgb);
                let run = ModelRun {
                    result,
                    inference_ms: ms(started.elapsed()),
                };
                analysis.models.insert(analyser.clone(), run);
            }
        }
        for (model, queue) in queues.iter().filter(|(model, _)| requested(model)) {
            match engine.prepare(model, &image) {
                Ok(input) => prepared.push((queue, input)),
                Err(e) => {
                    let run = ModelRun {
                        result: Err(e),
                        inference_ms: 0.0,
                    };
                    analysis.models.insert(model.clone(), run);
                }
            }
        }
        drop(image);
        drop(decoding);
        analysis.preprocess_ms = ms(decoded.elapsed());
        if prepared.is_empty() {
            if output.send((key, Ok(analysis))).is_err() {
                return;
            }
            continue;
        }
        let in_flight = Arc::new(InFlight {
            state: Mutex::new(InFlightState {
                key: Some(key),
                analysis,
                remaining: prepared.len(),
            }),
            output: output.clone(),
            span: inference,
        });
        for (queue, input) in prepared {
            let job = Job {
                image: in_flight.clone(),
                input,
            };
            if queue.send(job).is_err() {
                // The model thread is gone (it panicked): nothing will finish.
                return;
            }
        }
    }
}

fn model_loop<K>(engine: &Engine, model: &str, max_batch: usize, queue: &Mutex<Receiver<Job<K>>>) {
    loop {
        // The queue is held while waiting and taking a batch, not while running it: the
        // model's other threads take the next images meanwhile.
        let taken = {
            let queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
            queue.recv().ok().map(|first| {
                // Whatever else is ready goes in the same run, up to the model's batch.
                let mut images = vec![first.image];
                let mut inputs = vec![first.input];
                while inputs.len() < max_batch {
                    match queue.try_recv() {
                        Ok(job) => {
                            images.push(job.image);
                            inputs.push(job.input);
                        }
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                }
                (images, inputs)
            })
        };
        let Some((images, inputs)) = taken else {
            return;
        };
        // One span per run, in the trace of the batch's first image.
        let run =
            tracing::info_span!(parent: &images[0].span, "model", model, batch = inputs.len())
                .entered();
        let started = Instant::now();
        let results = engine.run_prepared(model, &inputs);
        drop(run);
        let share = ms(started.elapsed()) / inputs.len() as f64;
        drop(inputs);
        let mut results = results.into_iter();
        for image in images {
            let result = results
                .next()
                .unwrap_or_else(|| Err(InferenceError::Internal("no result for the image".into())));
            image.complete(
                model,
                ModelRun {
                    result,
                    inference_ms: share,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicked_thread_is_counted_once_the_results_end() {
        let (tx, output) = mpsc::unbounded_channel::<Outcome<u32>>();
        let sender = tx.clone();
        let fine = std::thread::spawn(move || drop(sender));
        let panicking = std::thread::spawn(move || {
            let _sender = tx;
            panic!("a pipeline thread panics");
        });
        let mut results = Results {
            output,
            threads: vec![fine, panicking],
            panicked: 0,
        };
        assert!(results.blocking_next().is_none());
        assert_eq!(results.panicked(), 1);
    }
}
