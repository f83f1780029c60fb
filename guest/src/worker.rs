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
//! (A worker thread that dies takes the process with it: the release build aborts on panic.)
//! Each finished job wakes the loop through a [`mio::Waker`] registered under the worker's
//! token. Jobs run one at a time in the order they were sent: a freeze sent after a trim or a
//! write waits for them, and the writes of one upload stay in order.
//!
//! Thawing never goes through the worker: a worker stuck on a frozen filesystem must not keep
//! the loop from thawing it.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use mio::{Registry, Token, Waker};

use crate::event_loop::Agent;

/// What the loop runs when a job is done: the job's reply, on the loop's thread.
pub type Finish = Box<dyn FnOnce(&mut Agent, Instant) + Send>;
/// A job: the blocking part, then what to do with its result.
type Job = Box<dyn FnOnce() -> Finish + Send>;

/// Stack of the worker thread; a recursive delete recurses once per directory level.
const WORKER_STACK_BYTES: usize = 256 * 1024;

/// The two queues between the loop and the worker. (A mutex and a condvar, not `mpsc`: the
/// same, in a fraction of the code size.) Neither side holds a lock while a job runs, so the
/// loop never waits for the worker.
#[derive(Default)]
struct Queues {
    jobs: Mutex<VecDeque<Job>>,
    wake_worker: Condvar,
    done: Mutex<Vec<Finish>>,
}

/// A lock that ignores poisoning: the queues stay whole whatever a job did.
fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The loop's handle on the worker thread.
pub struct Worker {
    queues: Arc<Queues>,
    /// Jobs sent whose [`Finish`] has not been taken yet.
    in_flight: usize,
    /// Finishes taken from the queue, oldest first, not yet run.
    ready: VecDeque<Finish>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Worker {
    /// Starts the thread; finished jobs make `token` readable on `registry`'s poll.
    pub fn start(registry: &Registry, token: Token) -> io::Result<Worker> {
        let waker = Waker::new(registry, token)?;
        let queues = Arc::new(Queues::default());
        let theirs = queues.clone();
        let body = Box::new(move || loop {
            let job = {
                let mut jobs = locked(&theirs.jobs);
                loop {
                    if let Some(job) = jobs.pop_front() {
                        break job;
                    }
                    jobs = theirs
                        .wake_worker
                        .wait(jobs)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            };
            let finish = job();
            locked(&theirs.done).push(finish);
            if let Err(e) = waker.wake() {
                log::error!("cannot wake the loop: {e}");
            }
        });
        crate::sys::spawn_thread(c"qx-fs-worker", WORKER_STACK_BYTES, body)?;
        Ok(Worker {
            queues,
            in_flight: 0,
            ready: VecDeque::new(),
        })
    }

    /// Runs `job` on the worker thread, after the jobs sent before it.
    pub fn submit(&mut self, job: impl FnOnce() -> Finish + Send + 'static) {
        locked(&self.queues.jobs).push_back(Box::new(job));
        self.queues.wake_worker.notify_one();
        self.in_flight += 1;
    }

    /// The next finished job, if any, in the order they were sent.
    pub fn next_finished(&mut self) -> Option<Finish> {
        if self.ready.is_empty() {
            self.ready.extend(locked(&self.queues.done).drain(..));
        }
        let f = self.ready.pop_front()?;
        self.in_flight -= 1;
        Some(f)
    }

    /// True when no job is queued, running, or waiting to be finished.
    pub fn is_idle(&self) -> bool {
        self.in_flight == 0
    }
}
