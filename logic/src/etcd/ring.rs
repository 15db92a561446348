//! The job a push goes to: consistent hashing over the jobs registered in etcd.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use goim_discovery::{JobRecord, WatchCache};
use goim_proto::grpc::{channel, RemoteJob};
use goim_proto::job::PushReply;
use goim_proto::logic::push_msg::Type as PushType;
use goim_proto::logic::PushMsg;
use goim_proto::service::JobService;
use tonic::Status;

/// Consistent hashing of pushes onto the registered jobs: one room's messages always go to the
/// same job (so they keep their order and batch together); when jobs come and go only the
/// rooms of the moved ring segments move.
pub struct JobRing {
    jobs: WatchCache<JobRecord>,
    clients: Mutex<HashMap<String, (String, RemoteJob)>>,
}

/// Points per job on the ring.
const VNODES: u32 = 64;

fn ring_hash(s: &[u8]) -> u64 {
    cityhasher::hash::<u64>(s)
}

/// Picks the owner of `route` among `ids` (sorted or not): the first ring point at or after the
/// route's hash.
pub fn ring_pick<'a>(ids: &'a [String], route: &str) -> Option<&'a String> {
    let mut points: BTreeMap<u64, &String> = BTreeMap::new();
    for id in ids {
        for v in 0..VNODES {
            points.insert(ring_hash(format!("{id}#{v}").as_bytes()), id);
        }
    }
    let h = ring_hash(route.as_bytes());
    points
        .range(h..)
        .next()
        .or_else(|| points.iter().next())
        .map(|(_, id)| *id)
}

impl JobRing {
    pub fn new(jobs: WatchCache<JobRecord>) -> Self {
        JobRing {
            jobs,
            clients: Mutex::new(HashMap::new()),
        }
    }

    pub fn synced(&self) -> bool {
        self.jobs.synced()
    }

    fn client_for(&self, route: &str) -> Result<RemoteJob, Status> {
        let jobs = self.jobs.snapshot();
        let ids: Vec<String> = jobs.iter().map(|(id, _)| id.clone()).collect();
        let id = ring_pick(&ids, route)
            .ok_or_else(|| Status::unavailable("no job registered in etcd"))?;
        let addr = jobs
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, e)| e.value.grpc.clone())
            .unwrap_or_default();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.retain(|k, _| ids.contains(k));
        if let Some((a, c)) = clients.get(id) {
            if *a == addr {
                return Ok(c.clone());
            }
        }
        let ch = channel(&addr)
            .map_err(|e| Status::unavailable(format!("job {id} address {addr}: {e}")))?;
        let c = RemoteJob::new(ch);
        clients.insert(id.clone(), (addr, c.clone()));
        Ok(c)
    }
}

/// What a push is routed by: the room, the first key, or the op (goim's Kafka keys).
pub fn route_of(m: &PushMsg) -> String {
    match PushType::try_from(m.r#type) {
        Ok(PushType::Room) => m.room.clone(),
        Ok(PushType::Push) => m.keys.first().cloned().unwrap_or_default(),
        _ => m.operation.to_string(),
    }
}

#[async_trait]
impl JobService for JobRing {
    async fn push(&self, msg: PushMsg) -> Result<PushReply, Status> {
        let job = self.client_for(&route_of(&msg))?;
        job.push(msg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
