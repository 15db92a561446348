//! What a member gets when a message arrives in a conversation. Every member's unread count
//! and preview follow from the stored message (nothing to do per member); beyond that:

use crate::Member;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Pushed now to every connection of the member.
    Push,
    /// Offline: a notification through the sink.
    Notify,
    /// Nothing now; the member sees it in its list and history.
    Nothing,
}

/// - the sender's own devices get its message (multi-device sync), never a notification;
/// - a muted member gets neither push nor notification ("receive but don't notify");
/// - an online member gets a push on all of its connections;
/// - an offline member gets a notification, unless it set do-not-disturb.
pub fn action(member: &Member, sender: i64, online: bool) -> Action {
    if member.mid == sender {
        return if online {
            Action::Push
        } else {
            Action::Nothing
        };
    }
    match (member.muted, online, member.dnd) {
        (true, _, _) => Action::Nothing,
        (false, true, _) => Action::Push,
        (false, false, false) => Action::Notify,
        (false, false, true) => Action::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(mid: i64, muted: bool, dnd: bool) -> Member {
        Member {
            mid,
            muted,
            dnd,
            read_seq: 0,
        }
    }

    #[test]
    fn each_member_gets_what_its_state_says() {
        let sender = 1;
        assert_eq!(action(&m(2, false, false), sender, true), Action::Push);
        assert_eq!(action(&m(2, false, true), sender, true), Action::Push);
        assert_eq!(action(&m(2, true, false), sender, true), Action::Nothing);
        assert_eq!(action(&m(2, true, false), sender, false), Action::Nothing);
        assert_eq!(action(&m(2, false, false), sender, false), Action::Notify);
        assert_eq!(action(&m(2, false, true), sender, false), Action::Nothing);
        // The sender: its other devices, even when it muted the conversation; no notification.
        assert_eq!(action(&m(1, true, false), sender, true), Action::Push);
        assert_eq!(action(&m(1, false, false), sender, false), Action::Nothing);
    }
}
