//! The Windows service manager, through the windows-service crate: a service `agentd`
//! (LocalSystem, started at boot) running `agentd.exe service run`, its settings in
//! `%ProgramData%\agentd\agentd.conf` and its keys in `%ProgramData%\agentd\state`. That
//! folder is closed to everyone but LocalSystem and Administrators (it holds the pre-auth
//! key and the private keys), and the service logs to `agentd.log` in it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{
    self, ServiceControlHandlerResult, ServiceStatusHandle,
};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};

use super::{run, InstallOptions, Runner, ServiceRun, Settings, Shutdown};

const NAME: &str = "agentd";
const DISPLAY_NAME: &str = "agentd mesh VPN";
const DESCRIPTION: &str = "Connects this device to its agentd network (userspace WireGuard).";
const KIND: ServiceType = ServiceType::OWN_PROCESS;
/// How long `uninstall` waits for the service to stop.
const STOP_WAIT: Duration = Duration::from_secs(15);

/// `%ProgramData%\agentd`.
pub fn data_dir() -> PathBuf {
    std::env::var_os("ProgramData")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"))
        .join("agentd")
}

fn settings_path() -> PathBuf {
    data_dir().join("agentd.conf")
}

/// Makes `%ProgramData%\agentd` a folder only LocalSystem and Administrators can use,
/// whoever created it: ordinary users may create folders in ProgramData, so one could
/// have made it first (or made it a link elsewhere) to read the keys later. A link or
/// file there is refused; an existing folder gets Administrators as owner and its access
/// lists replaced, down to every file in it (well-known SIDs: any language).
fn private_dir() -> anyhow::Result<PathBuf> {
    use std::os::windows::fs::MetadataExt as _;
    const FILE_ATTRIBUTE_REPARSE_POINT: u32 = 0x400;
    let dir = data_dir();
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() && m.file_attributes() & FILE_ATTRIBUTE_REPARSE_POINT == 0 => {}
        Ok(_) => anyhow::bail!(
            "{} is a link or a file, not a folder: remove it, then install again",
            dir.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(&dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?,
        Err(e) => anyhow::bail!("reading {}: {e}", dir.display()),
    }
    let d = dir.display().to_string();
    // /L: act on links themselves, never follow them.
    run(
        "icacls",
        &[&d, "/setowner", "*S-1-5-32-544", "/T", "/C", "/L", "/Q"],
    )?;
    // Explicit entries anyone added go; what is left is inherited…
    run("icacls", &[&d, "/reset", "/T", "/C", "/L", "/Q"])?;
    // …and the folder stops inheriting, so SYSTEM and Administrators are all there is.
    run(
        "icacls",
        &[
            &d,
            "/inheritance:r",
            "/grant:r",
            "*S-1-5-18:(OI)(CI)F",
            "*S-1-5-32-544:(OI)(CI)F",
            "/Q",
        ],
    )?;
    Ok(dir)
}

/// Appends a line to the service's log (for failures before logging is set up).
fn log_line(line: &str) {
    use std::io::Write as _;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir().join("agentd.log"))
    {
        let _ = writeln!(f, "agentd service: {line}");
    }
}

fn info(exe: &Path) -> ServiceInfo {
    ServiceInfo {
        name: OsString::from(NAME),
        display_name: OsString::from(DISPLAY_NAME),
        service_type: KIND,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: exe.to_path_buf(),
        launch_arguments: vec![OsString::from("service"), OsString::from("run")],
        dependencies: vec![],
        account_name: None, // LocalSystem
        account_password: None,
    }
}

pub fn install(o: &InstallOptions) -> anyhow::Result<String> {
    if o.root != Path::new("/") {
        anyhow::bail!(
            "--root is for Linux and macOS packaging; Windows installs into the service manager"
        );
    }
    let mut done = Vec::new();
    private_dir()?;
    if o.login_server.is_some() || o.auth_key.is_some() {
        let mut s = Settings::read(&settings_path())?;
        if let Some(u) = &o.login_server {
            s.login_server = Some(u.clone());
        }
        if let Some(k) = &o.auth_key {
            s.auth_key = Some(k.clone());
        }
        proto::secretfile::write_private(&settings_path(), s.to_text()?.as_bytes())?;
        done.push(format!(
            "wrote {} (LocalSystem and Administrators only)",
            settings_path().display()
        ));
    }
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )?;
    let access = ServiceAccess::QUERY_STATUS | ServiceAccess::CHANGE_CONFIG | ServiceAccess::START;
    let service = match manager.open_service(NAME, access) {
        Ok(service) => {
            service.change_config(&info(&o.exe))?;
            done.push(format!("updated the service {NAME}"));
            service
        }
        Err(_) => {
            let service = manager.create_service(&info(&o.exe), access)?;
            done.push(format!("created the service {NAME} (starts at boot)"));
            service
        }
    };
    service.set_description(DESCRIPTION)?;
    // Restarted when it fails, as systemd's Restart=on-failure and launchd's KeepAlive do.
    service.update_failure_actions(ServiceFailureActions {
        reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(24 * 3600)),
        reboot_msg: None,
        command: None,
        actions: Some(vec![
            ServiceAction {
                action_type: ServiceActionType::Restart,
                delay: Duration::from_secs(5),
            };
            3
        ]),
    })?;
    service.set_failure_actions_on_non_crash_failures(true)?;
    if o.start && service.query_status()?.current_state == ServiceState::Stopped {
        service.start::<&str>(&[])?;
        done.push(format!("started {NAME}"));
    }
    Ok(done.join("\n"))
}

pub fn uninstall(_root: &Path) -> anyhow::Result<String> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)?;
    let access = ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE;
    let Ok(service) = manager.open_service(NAME, access) else {
        return Ok("not installed; nothing to remove".into());
    };
    let mut done = Vec::new();
    if service.query_status()?.current_state != ServiceState::Stopped {
        let _ = service.stop();
        let deadline = Instant::now() + STOP_WAIT;
        while service.query_status()?.current_state != ServiceState::Stopped {
            if Instant::now() > deadline {
                anyhow::bail!("the service {NAME} did not stop within {STOP_WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        done.push(format!("stopped {NAME}"));
    }
    service.delete()?;
    done.push(format!("removed the service {NAME}"));
    match std::fs::remove_file(settings_path()) {
        Ok(()) => done.push(format!("removed {}", settings_path().display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("removing {}: {e}", settings_path().display()),
    }
    Ok(done.join("\n"))
}

pub fn status(_root: &Path) -> anyhow::Result<String> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)?;
    let Ok(service) = manager.open_service(NAME, ServiceAccess::QUERY_STATUS) else {
        return Ok("not installed".into());
    };
    let state = match service.query_status()?.current_state {
        ServiceState::Running => "running",
        ServiceState::Stopped => "stopped",
        ServiceState::StartPending => "starting",
        ServiceState::StopPending => "stopping",
        _ => "paused",
    };
    Ok(format!("installed; {state}"))
}

/// What the service runs, set once by [`run_service`] before the dispatcher starts.
static RUNNER: OnceLock<Runner> = OnceLock::new();

windows_service::define_windows_service!(ffi_service_main, service_main);

/// Hands this process to the service control manager (it must have started us).
pub fn run_service(runner: Runner) -> anyhow::Result<()> {
    let _ = RUNNER.set(runner);
    windows_service::service_dispatcher::start(NAME, ffi_service_main).map_err(|e| {
        anyhow::anyhow!(
            "`agentd service run` is started by the Windows service manager ({e}); use `agentd service install`"
        )
    })
}

fn service_main(_args: Vec<OsString>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tx = Mutex::new(Some(tx));
    // The handler reports StopPending itself, so it needs the handle registered below.
    let handle: std::sync::Arc<OnceLock<ServiceStatusHandle>> = std::sync::Arc::default();
    let for_handler = std::sync::Arc::clone(&handle);
    let handler = move |event| match event {
        ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
            if let Some(h) = for_handler.get() {
                set_state(*h, ServiceState::StopPending, 0);
            }
            if let Some(tx) = tx.lock().ok().and_then(|mut t| t.take()) {
                let _ = tx.send(());
            }
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let Ok(status) = service_control_handler::register(NAME, handler) else {
        return;
    };
    let _ = handle.set(status);
    // Whatever happened to the folder since install, it is private again before the
    // keys are read; if that cannot be done, agentd does not run.
    if let Err(e) = private_dir() {
        log_line(&format!("not starting: {e:#}"));
        set_state(status, ServiceState::Stopped, 1);
        return;
    }
    set_state(status, ServiceState::Running, 0);
    let shutdown: Shutdown = Box::pin(async move {
        let _ = rx.await;
    });
    let how = ServiceRun {
        settings: Settings::read(&settings_path()).unwrap_or_default(),
        state_dir: data_dir().join("state"),
        log_file: Some(data_dir().join("agentd.log")),
    };
    let result = match RUNNER.get() {
        Some(run) => run(how, shutdown),
        None => Err(anyhow::anyhow!("internal: no runner")),
    };
    // A non-zero exit code makes the service manager apply the failure actions.
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            log_line(&format!("stopped: {e:#}"));
            1
        }
    };
    set_state(status, ServiceState::Stopped, code);
}

fn set_state(status: ServiceStatusHandle, state: ServiceState, code: u32) {
    let accept = if state == ServiceState::Running {
        ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
    } else {
        ServiceControlAccept::empty()
    };
    let _ = status.set_service_status(ServiceStatus {
        service_type: KIND,
        current_state: state,
        controls_accepted: accept,
        exit_code: ServiceExitCode::Win32(code),
        checkpoint: 0,
        wait_hint: Duration::from_secs(10),
        process_id: None,
    });
}
