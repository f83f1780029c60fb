//! Users: logged-in sessions (utmp), passwords (through chpasswd on stdin) and ssh
//! authorized keys (atomic rewrite, owned by the user).

use std::path::PathBuf;

use qx_proto::agent::{
    ErrorCode, SetPasswordRequest, SshKeys, SshKeysAddRequest, SshKeysListRequest,
    SshKeysRemoveRequest, UserList,
};

use super::{ChildCommand, OpError, OpResult};

fn todo_err() -> OpError {
    OpError::new(
        ErrorCode::Unsupported,
        "user operations are not implemented yet",
    )
}

/// One /etc/passwd entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The user and group databases, as files (injectable for tests).
#[derive(Debug, Clone)]
pub struct UserDb {
    passwd: PathBuf,
    group: PathBuf,
}

impl UserDb {
    /// /etc/passwd and /etc/group.
    pub fn system() -> Self {
        UserDb::new(PathBuf::from("/etc/passwd"), PathBuf::from("/etc/group"))
    }

    pub fn new(passwd: PathBuf, group: PathBuf) -> Self {
        UserDb { passwd, group }
    }

    /// The passwd entry of `user` (a name or a numeric uid).
    pub fn user(&self, user: &str) -> OpResult<PasswdEntry> {
        let _ = (user, &self.passwd);
        Err(todo_err())
    }

    /// The gid of `group` (a name or a numeric gid).
    pub fn gid(&self, group: &str) -> OpResult<u32> {
        let _ = (group, &self.group);
        Err(todo_err())
    }
}

/// USER_PROCESS entries of /run/utmp (or /var/run/utmp); no file means nobody.
pub fn logged_in() -> OpResult<UserList> {
    Err(todo_err())
}

pub fn ssh_keys_list(db: &UserDb, req: &SshKeysListRequest) -> OpResult<SshKeys> {
    let _ = (db, req);
    Err(todo_err())
}

pub fn ssh_keys_add(db: &UserDb, req: &SshKeysAddRequest) -> OpResult<SshKeys> {
    let _ = (db, req);
    Err(todo_err())
}

pub fn ssh_keys_remove(db: &UserDb, req: &SshKeysRemoveRequest) -> OpResult<SshKeys> {
    let _ = (db, req);
    Err(todo_err())
}

/// The chpasswd child that sets the password ("user:password" on stdin, never argv).
pub fn set_password_command(db: &UserDb, req: &SetPasswordRequest) -> OpResult<ChildCommand> {
    let _ = (db, req);
    Err(todo_err())
}
