//! The job a push goes to: consistent hashing over the jobs registered in etcd.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use goim_discovery::{JobRecord, WatchCache};
use goim_proto::grpc::{Dialer, RemoteJob};
use goim_proto::job::PushReply;
use goim_proto::logic::push_msg::Type as PushType;
use goim_proto::logic::{HistoryReply, HistoryReq, PushMsg};
use goim_proto::service::JobService;
use tonic::Status;

/// Consistent hashing of pushes onto the registered jobs: one room's messages always go to the
/// same job (so they keep their order and batch together); when jobs come and go only the
/// rooms of the moved ring segments move.
pub struct JobRing {
    jobs: WatchCache<JobRecord>,
    /// Rebuilt when the mirror's version moves.
    ring: Mutex<std::sync::Arc<Ring>>,
    clients: Mutex<HashMap<String, (String, RemoteJob)>>,
    dialer: Dialer,
}

/// Points per job on the ring.
const VNODES: u32 = 64;

fn ring_hash(s: &[u8]) -> u64 {
    cityhasher::hash::<u64>(s)
}

/// Picks the owner of `route` among `ids` (sorted or not): the first ring point at or after the
/// route's hash.
pub fn ring_pick<'a>(ids: &'a [String], route: &str) -> Option<&'a String> {
    ring_order(ids, route).into_iter().next()
}

/// Every job in the order a push for `route` tries them: its owner first, then the owners
/// the ring would pick if the ones before were gone.
pub fn ring_order<'a>(ids: &'a [String], route: &str) -> Vec<&'a String> {
    let points = ring_points(ids);
    order_on(&points, ids.len(), route)
        .into_iter()
        .map(|i| &ids[i])
        .collect()
}

/// The ring's points in hash order, each naming its job by index in `ids` (built once per
/// change of the job set, not per push: 64 hashes per job).
fn ring_points(ids: &[String]) -> Vec<(u64, usize)> {
    let mut points: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        for v in 0..VNODES {
            points.insert(ring_hash(format!("{id}#{v}").as_bytes()), i);
        }
    }
    points.into_iter().collect()
}

/// Job indexes in the order a push for `route` tries them, on a ring of `jobs` jobs.
fn order_on(points: &[(u64, usize)], jobs: usize, route: &str) -> Vec<usize> {
    let h = ring_hash(route.as_bytes());
    let at = points.partition_point(|(p, _)| *p < h);
    let mut order: Vec<usize> = Vec::with_capacity(jobs);
    for (_, i) in points[at..].iter().chain(&points[..at]) {
        if !order.contains(i) {
            order.push(*i);
            if order.len() == jobs {
                break;
            }
        }
    }
    order
}

/// The ring as of one version of the job mirror: ids, addresses, points.
#[derive(Default)]
struct Ring {
    version: u64,
    jobs: Vec<(String, String)>,
    points: Vec<(u64, usize)>,
}

impl JobRing {
    pub fn new(jobs: WatchCache<JobRecord>, dialer: Dialer) -> Self {
        JobRing {
            jobs,
            ring: Mutex::default(),
            clients: Mutex::new(HashMap::new()),
            dialer,
        }
    }

    /// The ring for the jobs mirrored now.
    fn ring(&self) -> std::sync::Arc<Ring> {
        let version = *self.jobs.subscribe().borrow();
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.version != version || version == 0 {
            // Read after the version: a change racing this rebuild bumps it again.
            let jobs: Vec<(String, String)> = self
                .jobs
                .snapshot()
                .into_iter()
                .map(|(id, e)| (id, e.value.grpc))
                .collect();
            let ids: Vec<String> = jobs.iter().map(|(id, _)| id.clone()).collect();
            self.clients
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|k, _| ids.contains(k));
            *ring = std::sync::Arc::new(Ring {
                version,
                points: ring_points(&ids),
                jobs,
            });
        }
        ring.clone()
    }

    pub fn synced(&self) -> bool {
        self.jobs.synced()
    }

    /// The jobs to try for `route`, in ring order, with their addresses.
    fn candidates(&self, route: &str) -> Vec<(String, String)> {
        let ring = self.ring();
        order_on(&ring.points, ring.jobs.len(), route)
            .into_iter()
            .map(|i| ring.jobs[i].clone())
            .collect()
    }

    /// The client of job `id` at `addr`, made when first needed (or when the address moved).
    fn client(&self, id: &str, addr: &str) -> Result<RemoteJob, Status> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((a, c)) = clients.get(id) {
            if a == addr {
                return Ok(c.clone());
            }
        }
        let c = self
            .dialer
            .channel(addr)
            .map(RemoteJob::new)
            .map_err(|e| Status::unavailable(format!("job {id} address {addr}: {e}")))?;
        clients.insert(id.to_string(), (addr.to_string(), c.clone()));
        Ok(c)
    }
}

/// What a push is routed by: the room, the first key, or the op (goim's Kafka keys).
pub fn route_of(m: &PushMsg) -> String {
    // A numbered stream goes to the one job numbering it.
    if !m.stream.is_empty() {
        return m.stream.clone();
    }
    match PushType::try_from(m.r#type) {
        Ok(PushType::Room) => m.room.clone(),
        Ok(PushType::Push) => m.keys.first().cloned().unwrap_or_default(),
        _ => m.operation.to_string(),
    }
}

impl JobRing {
    /// Calls the jobs for `route` in ring order until one answers: the owner first; a job
    /// that did not take the call (unreachable, or draining for a shutdown) passes it to the
    /// next one, so a job restart loses nothing logic was still handing over.
    async fn first_that_takes<T, F, Fut>(&self, route: &str, call: F) -> Result<T, Status>
    where
        F: Fn(RemoteJob) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut last = Status::unavailable("no job registered in etcd");
        for (id, addr) in self.candidates(route) {
            let r = match self.client(&id, &addr) {
                Ok(job) => call(job).await,
                Err(e) => Err(e),
            };
            match r {
                Err(e) if not_taken(&e) => {
                    tracing::debug!(job = %id, error = %e, "job did not take the call; trying the next");
                    last = e;
                }
                // Anything else may have been taken (a job killed after delivering, before
                // answering): trying the next job would deliver it twice. The caller is told
                // instead.
                other => return other,
            }
        }
        Err(last)
    }
}

/// Whether a failed call certainly never reached the job: refused by a draining job, or no
/// connection could be made (refused, unreachable, timed out connecting).
fn not_taken(e: &Status) -> bool {
    if e.code() == tonic::Code::Unavailable && e.message() == "job is draining" {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            ) {
                return true;
            }
        }
        // tonic's connect timeout and hyper's connect errors say so in their text.
        let text = s.to_string();
        if text.contains("tcp connect error") || text.contains("error trying to connect") {
            return true;
        }
        source = s.source();
    }
    false
}

#[async_trait]
impl JobService for JobRing {
    /// A room's order holds except across a move to the next job (which numbers the room
    /// under a new epoch, so clients with recovery can tell).
    async fn push(&self, msg: PushMsg) -> Result<PushReply, Status> {
        self.first_that_takes(&route_of(&msg), |job| {
            let msg = msg.clone();
            async move { job.push(msg).await }
        })
        .await
    }

    /// Asked of the job that numbers the room now (the same order pushes take).
    async fn history(&self, req: HistoryReq) -> Result<HistoryReply, Status> {
        self.first_that_takes(&req.room.clone(), |job| {
            let req = req.clone();
            async move { job.history(req).await }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only calls that certainly never reached a job go to the next one: a killed job's
    /// broken call may have been delivered (the killed-job rollout test saw it delivered
    /// twice when such calls were retried).
    #[test]
    fn only_calls_never_taken_are_retried() {
        assert!(not_taken(&Status::unavailable("job is draining")));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(not_taken(&Status::from_error(Box::new(refused))));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!not_taken(&Status::from_error(Box::new(reset))));
        assert!(!not_taken(&Status::unknown(
            "h2 protocol error: broken pipe"
        )));
        assert!(!not_taken(&Status::unavailable("connection closed")));
        assert!(!not_taken(&Status::cancelled("request cancelled")));
    }

    #[test]
    fn ring_is_stable_and_moves_little() {
        let two: Vec<String> = vec!["job-a".into(), "job-b".into()];
        let three: Vec<String> = vec!["job-a".into(), "job-b".into(), "job-c".into()];
        let rooms: Vec<String> = (0..1000).map(|i| format!("live://{i}")).collect();
        let mut moved = 0;
        let mut per = HashMap::new();
        for r in &rooms {
            let a = ring_pick(&two, r).unwrap();
            assert_eq!(a, ring_pick(&two, r).unwrap());
            let b = ring_pick(&three, r).unwrap();
            *per.entry(b.clone()).or_insert(0) += 1;
            if a != b {
                moved += 1;
                assert_eq!(b, "job-c", "a room only moves to the new job");
            }
        }
        assert!(moved > 150 && moved < 550, "moved {moved}");
        assert!(per.values().all(|&n| n > 150), "{per:?}");
        assert!(ring_pick(&[], "x").is_none());
        for r in &rooms[..50] {
            let order = ring_order(&three, r);
            assert_eq!(order.len(), 3);
            assert_eq!(order[0], ring_pick(&three, r).unwrap());
            // Without the owner, the next in order is who the ring picks.
            let rest: Vec<String> = three.iter().filter(|j| *j != order[0]).cloned().collect();
            assert_eq!(ring_pick(&rest, r).unwrap(), order[1]);
        }
    }
}
