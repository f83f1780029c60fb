//! The filesystem worker: one thread for every call that can block in a filesystem.
//!
//! The loop must answer a ping within one turn, yet FITRIM and FIFREEZE can take seconds on a
//! slow disk, `fsync` waits for the device, a recursive delete or a directory read can be
//! long, and `stat` or `open` on a dead NFS or FUSE mount, or on a filesystem frozen behind
//! the agent's back, waits in the kernel for as long as that lasts. Those calls run here.
//!
//! The worker holds no protocol state. The loop sends it a job (a closure owning what it
//! needs: a policy clone, a request, a reader); the job returns a [`Finish`], a closure the
//! loop runs on the [`crate::event_loop::Agent`] to reply, in order, on the loop's thread.
//! Each finished job wakes the loop through a [`mio::Waker`] registered under the worker's
//! token. Jobs run one at a time in the order they were sent: a freeze sent after a trim or a
//! write waits for them, and the writes of one upload stay in order.
//!
//! Thawing never goes through the worker: a worker stuck on a frozen filesystem must not keep
//! the loop from thawing it.

use std::io;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use mio::{Registry, Token, Waker};

use crate::event_loop::Agent;

/// What the loop runs when a job is done: the job's reply, on the loop's thread.
pub type Finish = Box<dyn FnOnce(&mut Agent, Instant) + Send>;
/// A job: the blocking part, then what to do with its result.
type Job = Box<dyn FnOnce() -> Finish + Send>;

/// Stack of the worker thread; a recursive delete recurses once per directory level.
const WORKER_STACK_BYTES: usize = 256 * 1024;

/// The loop's handle on the worker thread.
pub struct Worker {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Finish>,
    /// Jobs sent whose [`Finish`] has not been taken yet.
    in_flight: usize,
    /// Finishes of jobs that ran on the loop because the thread was gone.
    orphans: Vec<Finish>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("in_flight", &self.in_flight)
            .field("orphans", &self.orphans.len())
            .finish()
    }
}

impl Worker {
    /// Starts the thread; finished jobs make `token` readable on `registry`'s poll.
    pub fn start(registry: &Registry, token: Token) -> io::Result<Worker> {
        let waker = Arc::new(Waker::new(registry, token)?);
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, done) = mpsc::channel::<Finish>();
        std::thread::Builder::new()
            .name("qx-fs-worker".into())
            .stack_size(WORKER_STACK_BYTES)
            .spawn(move || {
                for job in inbox {
                    if outbox.send(job()).is_err() {
                        return;
                    }
                    if let Err(e) = waker.wake() {
                        log::error!("cannot wake the loop: {e}");
                    }
                }
            })?;
        Ok(Worker {
            jobs,
            done,
            in_flight: 0,
            orphans: Vec::new(),
        })
    }

    /// Runs `job` on the worker thread. Should the thread be gone, the job runs here and now
    /// (it may block, but no reply is lost).
    pub fn submit(&mut self, job: impl FnOnce() -> Finish + Send + 'static) {
        match self.jobs.send(Box::new(job)) {
            Ok(()) => self.in_flight += 1,
            Err(mpsc::SendError(job)) => {
                log::error!("the filesystem worker is gone; running its job on the loop");
                let finish = job();
                self.orphans.push(finish);
            }
        }
    }

    /// The next finished job, if any.
    pub fn next_finished(&mut self) -> Option<Finish> {
        if let Some(f) = self.orphans.pop() {
            return Some(f);
        }
        let f = self.done.try_recv().ok()?;
        self.in_flight -= 1;
        Some(f)
    }

    /// True when no job is queued, running, or waiting to be finished.
    pub fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.orphans.is_empty()
    }
}
