//! The same suite against SQLite (a file in a temp dir) and a real PostgreSQL server.

use std::sync::OnceLock;

use crate::{ChatError, Kind, Limits, Page, Store, StoreKind};

fn postgres() -> &'static goim_testkit::Postgres {
    static PG: OnceLock<goim_testkit::Postgres> = OnceLock::new();
    PG.get_or_init(goim_testkit::Postgres::start)
}

/// Each test gets a fresh store of each kind.
async fn stores() -> Vec<(Store, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("data/chat.db").display());
    let limits = Limits {
        max_members: 50,
        max_body: 64,
        preview_chars: 5,
        max_page: 10,
    };
    let sqlite = Store::open(&url, limits.clone()).await.unwrap();
    let pg = Store::open(&postgres().database(), limits).await.unwrap();
    assert_eq!(sqlite.kind(), StoreKind::Sqlite);
    assert_eq!(pg.kind(), StoreKind::Postgres);
    vec![(sqlite, Some(dir)), (pg, None)]
}

#[tokio::test]
async fn sends_count_unread_per_member_and_previews_the_last_message() {
    for (s, _dir) in stores().await {
        let c = s.create(Some("g1"), Kind::Group, &[1, 2, 3]).await.unwrap();
        assert_eq!((c.id.as_str(), c.members, c.last_seq), ("g1", 3, 0));
        let inbox = s.inbox(2, 10).await.unwrap();
        assert_eq!(inbox.conversations.len(), 1);
        assert_eq!(inbox.conversations[0].unread, 0);
        assert!(inbox.conversations[0].last.is_none());

        let a = s.send("g1", 1, 5, "hello there", None).await.unwrap();
        let b = s.send("g1", 1, 5, "second", None).await.unwrap();
        assert_eq!((a.message.seq, b.message.seq), (1, 2));
        assert!(!a.duplicate);

        let inbox = s.inbox(2, 10).await.unwrap();
        let line = &inbox.conversations[0];
        assert_eq!((line.unread, line.last_seq, line.read_seq), (2, 2, 0));
        let last = line.last.as_ref().unwrap();
        assert_eq!((last.seq, last.sender, last.text.as_str()), (2, 1, "secon"));
        assert_eq!(inbox.total_unread, 2);
        // The sender has read its own messages.
        assert_eq!(s.inbox(1, 10).await.unwrap().total_unread, 0);

        assert_eq!(s.mark_read("g1", 2, 1).await.unwrap(), 1);
        assert_eq!(s.inbox(2, 10).await.unwrap().total_unread, 1);
        // A cursor never moves back, and never past the last message.
        assert_eq!(s.mark_read("g1", 2, 0).await.unwrap(), 1);
        assert!(matches!(
            s.mark_read("g1", 2, 3).await,
            Err(ChatError::Invalid(_))
        ));
        assert!(matches!(
            s.mark_read("g1", 9, 1).await,
            Err(ChatError::NotMember { .. })
        ));
        assert!(matches!(
            s.mark_read("nope", 2, 1).await,
            Err(ChatError::NotFound(_))
        ));
    }
}

/// A user's list is newest first even when sends fall in one millisecond (the message time's
/// unit): it follows the order of activity, not the clock (it tied, and then went by id).
#[tokio::test]
async fn the_list_is_newest_first_within_one_millisecond() {
    for (s, _dir) in stores().await {
        s.create(Some("a"), Kind::Group, &[1, 2]).await.unwrap();
        s.create(Some("b"), Kind::Group, &[1, 2]).await.unwrap();
        for i in 0..20 {
            for id in ["b", "a"] {
                s.send(id, 1, 5, &format!("{i}"), None).await.unwrap();
                let inbox = s.inbox(2, 10).await.unwrap();
                assert_eq!(
                    inbox.conversations[0].conversation, id,
                    "after a send to {id}"
                );
            }
        }
    }
}

#[tokio::test]
async fn muted_conversations_keep_unread_but_leave_the_total() {
    for (s, _dir) in stores().await {
        s.create(Some("loud"), Kind::Group, &[1, 2]).await.unwrap();
        s.create(Some("quiet"), Kind::Group, &[1, 2]).await.unwrap();
        let m = s.set_member("quiet", 2, Some(true), None).await.unwrap();
        assert!(m.muted && !m.dnd);
        let m = s.set_member("quiet", 2, None, Some(true)).await.unwrap();
        assert!(m.muted && m.dnd, "None leaves a flag as it was");
        s.send("loud", 1, 5, "a", None).await.unwrap();
        s.send("quiet", 1, 5, "b", None).await.unwrap();
        s.send("quiet", 1, 5, "c", None).await.unwrap();
        let inbox = s.inbox(2, 10).await.unwrap();
        // Most recent activity first.
        let ids: Vec<_> = inbox
            .conversations
            .iter()
            .map(|l| (l.conversation.as_str(), l.unread, l.muted))
            .collect();
        assert_eq!(ids, [("quiet", 2, true), ("loud", 1, false)]);
        assert_eq!(inbox.total_unread, 1);
        assert!(matches!(
            s.set_member("quiet", 7, Some(true), None).await,
            Err(ChatError::NotMember { .. })
        ));
    }
}

#[tokio::test]
async fn a_resend_with_the_same_client_id_returns_the_first_seq() {
    for (s, _dir) in stores().await {
        s.create(Some("g"), Kind::Group, &[1, 2]).await.unwrap();
        let first = s.send("g", 1, 5, "hi", Some("c-1")).await.unwrap();
        let again = s.send("g", 1, 5, "hi", Some("c-1")).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.message, first.message);
        // Another sender's id is its own.
        let other = s.send("g", 2, 5, "hi", Some("c-1")).await.unwrap();
        assert!(!other.duplicate);
        assert_eq!(other.message.seq, 2);
        assert_eq!(s.get("g").await.unwrap().last_seq, 2);
    }
}

#[tokio::test]
async fn concurrent_senders_get_distinct_consecutive_seqs() {
    for (s, _dir) in stores().await {
        s.create(Some("busy"), Kind::Group, &[1, 2, 3, 4])
            .await
            .unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for sender in 1..=4 {
            let s = s.clone();
            tasks.spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..25 {
                    // Half of them twice with one client id: a resend never takes a seq.
                    let id = format!("{sender}-{i}");
                    let sent = s.send("busy", sender, 5, "m", Some(&id)).await.unwrap();
                    if i % 2 == 0 {
                        let again = s.send("busy", sender, 5, "m", Some(&id)).await.unwrap();
                        assert_eq!(again.message.seq, sent.message.seq);
                    }
                    seqs.push(sent.message.seq);
                }
                seqs
            });
        }
        let mut all = Vec::new();
        while let Some(seqs) = tasks.join_next().await {
            all.extend(seqs.unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (1..=100).collect::<Vec<i64>>());
    }
}

#[tokio::test]
async fn history_pages_before_and_after_a_cursor() {
    for (s, _dir) in stores().await {
        s.create(Some("h"), Kind::Group, &[1, 2]).await.unwrap();
        for i in 1..=15 {
            s.send("h", 1, 5, &format!("m{i}"), None).await.unwrap();
        }
        let seqs = |v: Vec<crate::Message>| v.iter().map(|m| m.seq).collect::<Vec<_>>();
        let newest = s.history("h", 2, Page::Before(i64::MAX), 3).await.unwrap();
        assert_eq!(seqs(newest), [13, 14, 15]);
        let older = s.history("h", 2, Page::Before(13), 3).await.unwrap();
        assert_eq!(seqs(older), [10, 11, 12]);
        let after = s.history("h", 2, Page::After(12), 100).await.unwrap();
        assert_eq!(seqs(after), [13, 14, 15]);
        // Pages are capped at max_page.
        assert_eq!(
            s.history("h", 0, Page::After(0), 100).await.unwrap().len(),
            10
        );
        assert!(matches!(
            s.history("h", 2, Page::After(-1), 3).await,
            Err(ChatError::Invalid(_))
        ));
        assert!(matches!(
            s.history("h", 3, Page::After(0), 3).await,
            Err(ChatError::NotMember { .. })
        ));
        let m = s.message("h", 4).await.unwrap().unwrap();
        assert_eq!((m.body.as_str(), m.sender, m.op), ("m4", 1, 5));
    }
}

#[tokio::test]
async fn members_join_with_nothing_unread_and_bad_input_is_refused() {
    for (s, _dir) in stores().await {
        s.create(Some("m"), Kind::Group, &[1]).await.unwrap();
        s.send("m", 1, 5, "before you came", None).await.unwrap();
        assert_eq!(s.add_members("m", &[2, 3, 3]).await.unwrap(), 2);
        assert_eq!(s.add_members("m", &[2]).await.unwrap(), 0);
        assert_eq!(s.inbox(2, 10).await.unwrap().total_unread, 0);
        assert_eq!(s.members("m").await.unwrap().len(), 3);
        assert_eq!(s.remove_members("m", &[3, 4]).await.unwrap(), 1);
        assert!(matches!(
            s.send("m", 3, 5, "x", None).await,
            Err(ChatError::NotMember { .. })
        ));
        // A failed send takes no sequence number.
        assert_eq!(s.get("m").await.unwrap().last_seq, 1);
        assert!(matches!(
            s.send("m", 1, 5, &"x".repeat(65), None).await,
            Err(ChatError::Invalid(_))
        ));
        assert!(matches!(
            s.send("gone", 1, 5, "x", None).await,
            Err(ChatError::NotFound(_))
        ));
        assert!(matches!(
            s.create(Some("m"), Kind::Group, &[1]).await,
            Err(ChatError::Exists(_))
        ));
        assert!(matches!(
            s.create(Some("bad id!"), Kind::Group, &[1]).await,
            Err(ChatError::Invalid(_))
        ));
        assert!(matches!(
            s.create(None, Kind::Group, &[0]).await,
            Err(ChatError::Invalid(_))
        ));
        let too_many: Vec<i64> = (1..=51).collect();
        assert!(matches!(
            s.add_members("m", &too_many).await,
            Err(ChatError::Invalid(_))
        ));
        assert_eq!(s.members("m").await.unwrap().len(), 2, "rolled back");
        // A backend's message comes from no member.
        assert_eq!(
            s.send("m", 0, 5, "system", None).await.unwrap().message.seq,
            2
        );
        assert!(s.delete("m").await.unwrap());
        assert!(!s.delete("m").await.unwrap());
        assert!(matches!(s.members("m").await, Err(ChatError::NotFound(_))));
        assert!(s.inbox(1, 10).await.unwrap().conversations.is_empty());
    }
}

#[tokio::test]
async fn a_direct_conversation_is_named_by_its_two_members() {
    for (s, _dir) in stores().await {
        let a = s.create(None, Kind::Direct, &[9, 4]).await.unwrap();
        assert_eq!(a.id, "direct:4:9");
        s.send(&a.id, 4, 5, "hey", None).await.unwrap();
        let b = s.create(None, Kind::Direct, &[4, 9]).await.unwrap();
        assert_eq!((b.id.as_str(), b.last_seq), ("direct:4:9", 1));
        assert!(matches!(
            s.add_members(&a.id, &[5]).await,
            Err(ChatError::Invalid(_))
        ));
        assert!(matches!(
            s.create(None, Kind::Direct, &[4]).await,
            Err(ChatError::Invalid(_))
        ));
    }
}

#[tokio::test]
async fn unnotified_messages_wait_until_marked() {
    for (s, _dir) in stores().await {
        s.create(Some("n"), Kind::Group, &[1, 2]).await.unwrap();
        s.send("n", 1, 5, "a", None).await.unwrap();
        s.send("n", 1, 5, "b", None).await.unwrap();
        let now = crate::now_ms();
        assert_eq!(
            s.unnotified(now, 10).await.unwrap(),
            [("n".to_string(), 1), ("n".to_string(), 2)]
        );
        assert!(s.unnotified(0, 10).await.unwrap().is_empty());
        s.mark_notified("n", 1).await.unwrap();
        assert_eq!(s.unnotified(now, 10).await.unwrap(), [("n".to_string(), 2)]);
    }
}

#[tokio::test]
async fn a_store_keeps_everything_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("chat.db").display());
    let pg = postgres().database();
    for url in [url, pg] {
        {
            let s = Store::open(&url, Limits::default()).await.unwrap();
            s.create(Some("keep"), Kind::Group, &[1, 2]).await.unwrap();
            s.send("keep", 1, 5, "stays", None).await.unwrap();
        }
        // Opening again runs the migrations again: nothing to do, nothing lost.
        let s = Store::open(&url, Limits::default()).await.unwrap();
        assert_eq!(s.inbox(2, 10).await.unwrap().total_unread, 1);
        let seq = s
            .send("keep", 2, 5, "next", None)
            .await
            .unwrap()
            .message
            .seq;
        assert_eq!(seq, 2);
    }
    assert!(matches!(
        Store::open("mysql://x", Limits::default()).await,
        Err(ChatError::Invalid(_))
    ));
}

#[tokio::test]
async fn the_members_version_moves_with_every_change_that_decides_delivery() {
    for (s, _dir) in stores().await {
        s.create(Some("v"), Kind::Group, &[1, 2]).await.unwrap();
        let version = |s: &Store| {
            let s = s.clone();
            async move { s.members_versioned("v").await.unwrap().0.unwrap() }
        };
        let v0 = version(&s).await;
        let sent = s.send("v", 1, 5, "a", None).await.unwrap();
        assert_eq!(sent.members_version, Some(v0), "a send is not a change");
        s.mark_read("v", 2, 1).await.unwrap();
        assert_eq!(version(&s).await, v0, "nor is a read");
        s.add_members("v", &[3]).await.unwrap();
        let v1 = version(&s).await;
        s.set_member("v", 3, Some(true), None).await.unwrap();
        let v2 = version(&s).await;
        s.remove_members("v", &[3]).await.unwrap();
        let v3 = version(&s).await;
        assert!(v0 < v1 && v1 < v2 && v2 < v3, "{v0} {v1} {v2} {v3}");
        assert_eq!(
            s.send("v", 1, 5, "b", None).await.unwrap().members_version,
            Some(v3)
        );
        // Created again under the same id: not the old conversation's version.
        s.delete("v").await.unwrap();
        s.create(Some("v"), Kind::Group, &[1, 2]).await.unwrap();
        assert!(![v0, v1, v2, v3].contains(&version(&s).await));
    }
}
