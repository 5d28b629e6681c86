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
    ServiceAccess, ServiceControl, ServiceControlAccept, ServiceErrorControl, ServiceExitCode,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
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

/// Creates `%ProgramData%\agentd` closed to all but LocalSystem and Administrators
/// (well-known SIDs, so the names' language does not matter).
fn private_dir() -> anyhow::Result<PathBuf> {
    let dir = data_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    let d = dir.display().to_string();
    run(
        "icacls",
        &[
            &d,
            "/inheritance:r",
            "/grant:r",
            "*S-1-5-18:(OI)(CI)F",
            "/grant:r",
            "*S-1-5-32-544:(OI)(CI)F",
        ],
    )?;
    Ok(dir)
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
        let mut s = Settings::read(&settings_path()).unwrap_or_default();
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
    let handler = move |event| match event {
        ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
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
    let report = |state, accept, code| {
        let _ = status.set_service_status(ServiceStatus {
            service_type: KIND,
            current_state: state,
            controls_accepted: accept,
            exit_code: ServiceExitCode::Win32(code),
            checkpoint: 0,
            wait_hint: Duration::from_secs(10),
            process_id: None,
        });
    };
    report(
        ServiceState::Running,
        ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN,
        0,
    );
    let shutdown: Shutdown = Box::pin(async move {
        let _ = rx.await;
    });
    let how = ServiceRun {
        settings: Settings::read(&settings_path()).unwrap_or_default(),
        state_dir: data_dir().join("state"),
        log_file: Some(data_dir().join("agentd.log")),
    };
    let ok = RUNNER.get().is_some_and(|run| run(how, shutdown).is_ok());
    // ERROR_SERVICE_SPECIFIC_ERROR would need a code of ours; a generic failure will do.
    report(
        ServiceState::Stopped,
        ServiceControlAccept::empty(),
        if ok { 0 } else { 1 },
    );
}
