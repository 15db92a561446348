//! A client of the extensions (docs/PROTOCOL.md) for the recovery tiers: it said HELLO,
//! follows POSITION, and keeps every numbered message with its stream and position.

#![allow(dead_code)]

use std::net::SocketAddr;

use goim_client::{token, Client, Transport};
use goim_proto::op;
use serde_json::{json, Value};

use crate::common;

/// A client that said HELLO, and the room messages it got with their positions.
pub struct Ext {
    pub c: Client,
    /// (epoch, offset, body) of each room message, in arrival order.
    pub got: Vec<(String, u64, String)>,
    /// The position the next `left` packets are numbered from.
    pub next: Option<(String, u64, u64)>,
    /// The last position seen: the JOIN's, then each message's.
    pub pos: Option<(String, u64)>,
    /// The stream of each message in `got`.
    pub streams: Vec<String>,
    /// The last position seen per stream.
    pub at: std::collections::HashMap<String, (String, u64)>,
    /// The stream the next `left` packets belong to.
    pub next_stream: String,
}

impl Ext {
    /// A fresh record over a connection.
    fn over(c: Client) -> Ext {
        Ext {
            c,
            got: Vec::new(),
            next: None,
            pos: None,
            streams: Vec::new(),
            at: Default::default(),
            next_stream: String::new(),
        }
    }

    pub async fn connect(addr: SocketAddr, t: Transport, key: &str) -> Ext {
        let mut c = Client::connect(t, addr, None).await.unwrap();
        // No room at auth: the JOIN below decides what comes first.
        c.auth(&token(1, key, "", &[])).await.unwrap();
        c.send(op::HELLO, br#"{"v":1}"#).await.unwrap();
        let p = common::within(c.recv()).await.unwrap();
        assert_eq!(p.op, op::HELLO_REPLY);
        Ext::over(c)
    }

    /// Joins `room`, recovering from `from` when given; returns the JOIN_REPLY.
    pub async fn join(&mut self, room: &str, from: Option<(&str, u64)>) -> Value {
        self.try_join(room, from).await.unwrap()
    }

    /// As [`Ext::join`], or why the connection went away first.
    pub async fn try_join(
        &mut self,
        room: &str,
        from: Option<(&str, u64)>,
    ) -> Result<Value, String> {
        let mut body = json!({ "room": room });
        if let Some((epoch, offset)) = from {
            body["recover"] = json!({"epoch": epoch, "offset": offset});
        }
        self.c
            .send(op::JOIN, body.to_string().as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let p = self.try_recv().await?;
            if p.op == op::JOIN_REPLY {
                let v: Value = serde_json::from_slice(&p.body).unwrap();
                if v.get("error").is_some() {
                    return Ok(v);
                }
                let offset = v["offset"].as_u64().unwrap();
                self.pos = Some((v["epoch"].as_str().unwrap().to_string(), offset));
                self.at.insert(room.to_string(), self.pos.clone().unwrap());
                return Ok(v);
            }
        }
    }

    pub async fn recv(&mut self) -> goim_client::Packet {
        self.try_recv().await.unwrap()
    }

    /// The next packet (bounded wait), or why there is none.
    pub async fn try_recv(&mut self) -> Result<goim_client::Packet, String> {
        let p = tokio::time::timeout(common::LIMIT, self.c.recv())
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        match p.op {
            op::POSITION => {
                let v: Value = serde_json::from_slice(&p.body).unwrap();
                self.next = Some((
                    v["epoch"].as_str().unwrap().to_string(),
                    v["offset"].as_u64().unwrap(),
                    v["count"].as_u64().unwrap(),
                ));
                self.next_stream = v["stream"].as_str().unwrap().to_string();
            }
            1000 => {
                let (epoch, offset, left) =
                    self.next.take().expect("a room message has a position");
                self.got.push((
                    epoch.clone(),
                    offset,
                    String::from_utf8(p.body.clone()).unwrap(),
                ));
                self.pos = Some((epoch.clone(), offset));
                self.streams.push(self.next_stream.clone());
                self.at
                    .insert(self.next_stream.clone(), (epoch.clone(), offset));
                if left > 1 {
                    self.next = Some((epoch, offset + 1, left - 1));
                }
            }
            _ => {}
        }
        Ok(p)
    }

    /// Reads until a room message with this body arrives.
    pub async fn until(&mut self, body: &str) {
        while !self.got.iter().any(|(_, _, b)| b == body) {
            self.recv().await;
        }
    }

    pub fn last(&self) -> (String, u64) {
        self.pos.clone().expect("joined")
    }

    /// The bodies and offsets of one stream's messages, in arrival order.
    pub fn of(&self, stream: &str) -> (Vec<String>, Vec<u64>) {
        self.got
            .iter()
            .zip(&self.streams)
            .filter(|(_, s)| *s == stream)
            .map(|(g, _)| (g.2.clone(), g.1))
            .unzip()
    }
}

impl Ext {
    /// Connects as user `mid` sending AUTH, HELLO and RECOVER in one write (so nothing
    /// pushed to the user can come before the recovery's reply); returns the RECOVER_REPLY.
    pub async fn recovering_user(
        addr: SocketAddr,
        mid: i64,
        key: &str,
        from: (&str, u64),
    ) -> (Ext, Value) {
        Ext::try_recovering_user(addr, mid, key, from)
            .await
            .unwrap_or_else(|e| panic!("{addr}: {e}"))
    }

    /// As [`Ext::recovering_user`], or why the comet would not have it (refused, closed).
    pub async fn try_recovering_user(
        addr: SocketAddr,
        mid: i64,
        key: &str,
        from: (&str, u64),
    ) -> Result<(Ext, Value), String> {
        let recover = json!({"user": {"epoch": from.0, "offset": from.1}});
        let (ext, mut replies) = Ext::try_recovering(addr, mid, key, recover).await?;
        Ok((ext, replies.remove(0)))
    }

    /// Connects as user `mid` with `key`, sending AUTH, HELLO and this RECOVER body in one
    /// write; returns one RECOVER_REPLY per stream it names (an error reply alone ends it).
    pub async fn try_recovering(
        addr: SocketAddr,
        mid: i64,
        key: &str,
        recover: Value,
    ) -> Result<(Ext, Vec<Value>), String> {
        let mut c = Client::connect(Transport::Tcp, addr, None)
            .await
            .map_err(|e| e.to_string())?;
        let streams = ["user", "key"]
            .iter()
            .filter(|s| recover.get(**s).is_some())
            .count();
        let mut hello = goim_client::encode(1, op::AUTH, 1, &token(mid, key, "", &[]));
        hello.extend(goim_client::encode(1, op::HELLO, 2, br#"{"v":1}"#));
        hello.extend(goim_client::encode(
            1,
            op::RECOVER,
            3,
            recover.to_string().as_bytes(),
        ));
        c.send_bytes(&hello).await.map_err(|e| e.to_string())?;
        let mut ext = Ext::over(c);
        let mut replies = Vec::new();
        while replies.len() < streams.max(1) {
            let p = ext.try_recv().await?;
            if p.op == op::RECOVER_REPLY {
                let v: Value = serde_json::from_slice(&p.body).unwrap();
                if v.get("error").is_some() {
                    return Ok((ext, vec![v]));
                }
                let pos = (
                    v["epoch"].as_str().unwrap().to_string(),
                    v["offset"].as_u64().unwrap(),
                );
                ext.pos = Some(pos.clone());
                ext.at
                    .insert(v["stream"].as_str().unwrap().to_string(), pos);
                replies.push(v);
            }
        }
        Ok((ext, replies))
    }
}
