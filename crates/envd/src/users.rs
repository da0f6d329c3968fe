//! User and group lookup from `/etc/passwd` and `/etc/group`.
//!
//! The files are parsed directly instead of going through libc's `getpwnam`:
//! the sandbox's passwd file can change after envd starts (templates add users),
//! NSS modules may be missing in minimal images, and libc caches are not
//! something PID 1 should depend on.

use std::path::{Path, PathBuf};

/// A resolved account, with everything needed to run a process or do file
/// operations as it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: String,
    /// Supplementary group ids, including the primary gid.
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
    shell: String,
}

#[derive(Debug, Clone)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// A snapshot of the account databases.
#[derive(Debug, Clone, Default)]
pub struct UserDb {
    passwd: Vec<PasswdEntry>,
    groups: Vec<GroupEntry>,
}

impl UserDb {
    /// Reads the system's `/etc/passwd` and `/etc/group`; a missing file counts as empty.
    pub fn load() -> Self {
        Self::load_from(Path::new("/etc/passwd"), Path::new("/etc/group"))
    }

    pub fn load_from(passwd: &Path, group: &Path) -> Self {
        let passwd = std::fs::read_to_string(passwd).unwrap_or_default();
        let group = std::fs::read_to_string(group).unwrap_or_default();
        Self::parse(&passwd, &group)
    }

    pub fn parse(passwd: &str, group: &str) -> Self {
        let passwd = passwd
            .lines()
            .filter_map(|line| {
                let line = line.trim_end();
                if line.is_empty() || line.starts_with('#') {
                    return None;
                }
                let fields: Vec<&str> = line.split(':').collect();
                if fields.len() < 7 {
                    return None;
                }
                Some(PasswdEntry {
                    name: fields[0].to_string(),
                    uid: fields[2].parse().ok()?,
                    gid: fields[3].parse().ok()?,
                    home: fields[5].to_string(),
                    shell: fields[6].to_string(),
                })
            })
            .collect();
        let groups = group
            .lines()
            .filter_map(|line| {
                let line = line.trim_end();
                if line.is_empty() || line.starts_with('#') {
                    return None;
                }
                let fields: Vec<&str> = line.split(':').collect();
                if fields.len() < 3 {
                    return None;
                }
                let members = fields
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                Some(GroupEntry {
                    name: fields[0].to_string(),
                    gid: fields[2].parse().ok()?,
                    members,
                })
            })
            .collect();
        UserDb { passwd, groups }
    }

    pub fn user(&self, name: &str) -> Option<User> {
        let entry = self.passwd.iter().find(|e| e.name == name)?;
        let mut groups = vec![entry.gid];
        for group in &self.groups {
            if group.members.iter().any(|m| m == name) && !groups.contains(&group.gid) {
                groups.push(group.gid);
            }
        }
        let home = if entry.home.is_empty() {
            PathBuf::from("/")
        } else {
            PathBuf::from(&entry.home)
        };
        Some(User {
            name: entry.name.clone(),
            uid: entry.uid,
            gid: entry.gid,
            home,
            shell: entry.shell.clone(),
            groups,
        })
    }

    /// The user name for `uid`, or the number itself when unknown (like `ls -l`).
    pub fn user_name(&self, uid: u32) -> String {
        self.passwd
            .iter()
            .find(|e| e.uid == uid)
            .map(|e| e.name.clone())
            .unwrap_or_else(|| uid.to_string())
    }

    /// The group name for `gid`, or the number itself when unknown.
    pub fn group_name(&self, gid: u32) -> String {
        self.groups
            .iter()
            .find(|g| g.gid == gid)
            .map(|g| g.name.clone())
            .unwrap_or_else(|| gid.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # comment\n\
        user:x:1000:1000::/home/user:/bin/sh\n\
        broken line\n";
    const GROUP: &str = "root:x:0:\nuser:x:1000:\nsudo:x:27:user,other\ndocker:x:999:user\n";

    #[test]
    fn resolves_user_with_supplementary_groups() {
        let db = UserDb::parse(PASSWD, GROUP);
        let user = db.user("user").unwrap();
        assert_eq!(user.uid, 1000);
        assert_eq!(user.gid, 1000);
        assert_eq!(user.home, PathBuf::from("/home/user"));
        assert_eq!(user.groups, vec![1000, 27, 999]);
        assert!(db.user("nobody").is_none());
    }

    #[test]
    fn names_fall_back_to_numbers() {
        let db = UserDb::parse(PASSWD, GROUP);
        assert_eq!(db.user_name(0), "root");
        assert_eq!(db.user_name(4242), "4242");
        assert_eq!(db.group_name(27), "sudo");
        assert_eq!(db.group_name(4242), "4242");
    }
}
